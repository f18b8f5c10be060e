#!/usr/bin/env bash
# The suite (issue 13): one fitted guard per checkpoint (ResNet-20/32/44) scored on every category:
# near OOD (CIFAR-100, TIN), far (MNIST as is and JPEG-matched), noise, blank frames, FGSM/BIM/PGD/
# PGD-L2/IGM at 8/255 (L2 0.5) and FGSM/PGD at 2/255, and with --shortcut the moved and removed marker
# on bench shortcut's CIFAR-10 model; single and fused detectors. Writes results/suite/.
# Needs the shared data (COVGUARD_DATA or ../shared/data). Not yet run in full: expect about
# 40-60 min per checkpoint plus ~30 min for the shortcut model on the shared 2-core machine (estimated
# from bench adversarial and bench shortcut). Scores and attacks are cached ($COVGUARD_CACHE/suite or
# ~/.cache/covguard/suite): a stopped run restarted with the same settings keeps what it computed.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/covguard -v bench suite --shortcut --out results/suite "$@"
