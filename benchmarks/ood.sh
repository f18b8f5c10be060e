#!/usr/bin/env bash
# Reproduces results/ood (issue 4): CIFAR-10 vs CIFAR-100, TIN, MNIST (as is, JPEG-matched), noise;
# 3 checkpoints, 2,000 seeded images per evaluation set. Needs the shared data.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/covguard -v bench ood --max-eval 2000 --out results/ood "$@"
