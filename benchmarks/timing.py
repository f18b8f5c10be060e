"""Timing benchmark: patch-Mahalanobis scoring and fitting next to the bare forward pass.

    python benchmarks/timing.py --out reports/timing            # full run (about 30 min on 2 CPU cores)
    python benchmarks/timing.py --out reports/timing --quick    # reduced run (a few minutes)

Prints the markdown tables and writes ``results.json`` / ``results.md`` to ``--out``. The same as
``covguard bench timing ...``: the options live in :mod:`covguard.cli`, the benchmark in
:mod:`covguard.bench.timing`.
"""

import sys

from covguard.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "timing", *sys.argv[1:]]))
