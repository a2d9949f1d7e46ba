"""Benchmarks: `python -m minread.bench NAME [options]`.

Each benchmark lives in its own module here (`minread/bench/NAME.py`) with a
`main(argv)` function. It prints human-readable figures measured side by side in one
run, and its last line is one JSON object holding the same figures, so scripts and
notebooks can read it. Speed targets live here, never in unit tests.
"""

import json
import os
import platform

import torch

BENCHES = ["data", "vae", "speech_ae", "attention", "dit", "schedules", "generate", "long"]


def machine():
    """What the figures were measured on: the device and the number of threads."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(figures):
    """Print the benchmark's closing JSON line (must be the last thing printed)."""
    print(json.dumps(figures, default=float), flush=True)
