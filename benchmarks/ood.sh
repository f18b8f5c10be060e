#!/usr/bin/env bash
# Reproduces results/ood (issue 4): CIFAR-10 vs CIFAR-100, TIN, MNIST (as is, JPEG-matched), noise;
# 3 checkpoints, 2,000 seeded images per evaluation set, with the variant sweep and its ID-only
# selection rule (72 min on the shared 2-core machine, one thread). Needs the shared data.
# The full-size check on one checkpoint (every image of every set, no sweep):
#   .venv/bin/covguard -v bench ood --models resnet20 --out results/ood-full-resnet20
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/covguard -v bench ood --max-eval 2000 --variants --out results/ood "$@"
