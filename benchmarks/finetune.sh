#!/usr/bin/env bash
# Fine-tune the shared CIFAR-10 ResNet-20/32/44 on the JPEG training set (whole network, 3 epochs,
# crop + flip, SGD with a cosine schedule) and write checkpoints/<model>-jpeg.{safetensors,json,log}.
# One thread each, one after the other (about 50 min in all on this 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
for model in resnet20 resnet32 resnet44; do
  OMP_NUM_THREADS=1 .venv/bin/covguard -v --threads 1 finetune --model "$model" --epochs 3 --no-progress "$@" \
    2>&1 | tee "checkpoints/$model-jpeg.log"
done
