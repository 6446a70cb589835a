#!/usr/bin/env bash
# GPU check (issue 14, point 5), ready to run on a machine with an NVIDIA GPU: a Qwen2.5-0.5B-shaped node (random
# weights, no hub) for a few rounds in bf16 without and with LoRA; prints generation tokens/s, training step time and
# peak GPU memory against node.memory_plan's plan. Needs a CUDA build of torch in .venv (scripts/setup.sh installs the
# CPU build: replace it with e.g. `.venv/bin/pip install torch==2.13.0 --index-url <a CUDA wheel index>`).
# Micro-batches not given are picked by the memory plan for the GPU, as `join` picks them (printed per mode).
# Usage: bash scripts/gpu_check.sh [--rounds 3] [--modes full,lora] [--max-new-tokens 256] [--micro-batch-size 4] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
else
  echo "gpu_check: this check needs a machine with an NVIDIA GPU (no nvidia-smi here)" >&2
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
  f"gpu_check needs an NVIDIA GPU: torch {torch.__version__} sees no CUDA device (on a GPU machine, install a CUDA "
  "build of torch into .venv); python scripts/gpu_check.py --device cpu --smoke checks the script on CPU")'
"$PY" scripts/gpu_check.py "$@"
