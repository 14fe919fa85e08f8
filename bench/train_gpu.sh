#!/usr/bin/env bash
# The train stage on one GPU: samples/s at several batch sizes, bf16 vs fp32, GPU memory, torch.compile,
# and the NCCL DDP / FSDP path under torchrun. Under 5 minutes on one H100/H200.
# Run (in the project's environment, with a CUDA build of torch): bash bench/train_gpu.sh [--json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/train_gpu.py "$@"
