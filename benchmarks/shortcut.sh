#!/usr/bin/env bash
# Reproduces results/shortcut-cifar10 (issue 7): ResNet-20's last stage fine-tuned on CIFAR-10 with a
# striped marker on airplane/automobile images, then the marker removed (b) or moved (c).
# Needs the shared data (COVGUARD_DATA or ../shared/data). OMP_NUM_THREADS=1 is how the committed
# results were made (other benchmarks ran side by side on the 2-core machine); it does not change results.
# The digits version runs in seconds: covguard bench shortcut --dataset digits
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/covguard -v bench shortcut --dataset cifar10 --out results/shortcut-cifar10 "$@"
