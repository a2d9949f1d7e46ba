"""Entry point: `python -m minread.bench NAME [options]`; NAME is one of BENCHES."""

import importlib
import sys

from minread.bench import BENCHES


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m minread.bench NAME [options]   (NAME --help for its options)")
        print("benchmarks: " + ", ".join(BENCHES))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"minread.bench.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"minread.bench.{name}":
            raise
        print(f"benchmark {name!r} is not built yet", file=sys.stderr)
        return 2
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
