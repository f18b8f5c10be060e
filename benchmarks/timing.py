"""Timing benchmark: patch-Mahalanobis scoring and fitting next to the bare forward pass.

    python benchmarks/timing.py --out reports/timing            # full run (about 30 min on 2 CPU cores)
    python benchmarks/timing.py --out reports/timing --quick    # reduced run (a few minutes)

Prints the markdown tables and writes ``results.json`` / ``results.md`` to ``--out``. The options
and the entry point live in :mod:`covguard.bench.timing` (``add_timing_arguments``, ``main``),
which ``covguard bench timing`` shares.
"""

import argparse
import logging
import sys

from covguard.bench.timing import add_timing_arguments, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = add_timing_arguments(argparse.ArgumentParser(description="covguard timing benchmark"))
    sys.exit(main(parser.parse_args()))
