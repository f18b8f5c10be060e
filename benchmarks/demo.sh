#!/usr/bin/env bash
# Reproduces the README's demo table (reports/demo/results.md); same as `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
make demo
