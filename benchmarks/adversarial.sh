#!/usr/bin/env bash
# Reproduces results/adversarial (issue 3): 3 checkpoints x 5 attacks + mix, 13 detectors.
# Needs the shared data (COVGUARD_DATA or ../shared/data). OMP_NUM_THREADS=1 is how the committed
# results were made (two benchmarks ran side by side on the 2-core machine); it does not change results.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/covguard -v bench adversarial --out results/adversarial "$@"
