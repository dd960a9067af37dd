#!/usr/bin/env bash
# The GPU check: PPO on a ~100M-parameter model (bf16, gradient checkpointing), ratio 1 at the first
# update, finite losses, tokens/s and peak GPU memory; generate/eval placing their models on the GPU.
# Under 5 minutes on one GPU. Usage: bench/gpu_check.sh [--out DIR]   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=src exec "${PYTHON:-python}" bench/gpu_check.py --device cuda "$@"
