"""Execute notebooks top to bottom, headless, and fail on the first error.

MINREAD_FAST=1 (set by .ci/run) asks each notebook for its short tiny-preset run.
Outputs are not written back: notebooks stay committed without outputs.
"""

import sys
import time

import nbformat
from nbclient import NotebookClient

failed = []
for path in sys.argv[1:]:
    t0 = time.time()
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": "notebooks"}}).execute()
        print(f"ok   {path}  {time.time() - t0:.0f} s", flush=True)
    except Exception as e:  # report which notebook and cell failed, then carry on
        print(f"FAIL {path}  {time.time() - t0:.0f} s\n{e}", flush=True)
        failed.append(path)
if failed:
    sys.exit(f"{len(failed)} notebook(s) failed: {', '.join(failed)}")
