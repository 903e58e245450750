#!/usr/bin/env bash
# Prepare a single multi-GPU host (CUDA 12) and run the pipeline on it; run it on the host itself.
#
#   launch/gpu_host.sh --config=configs/gsm8k.py:compare --workdir=/data/runs/gsm8k \
#     --config.supervisor.model_dir=/data/models/gemma-2b \
#     --config.student.model_dir=/data/models/mistral-7b
#   launch/gpu_host.sh --config=configs/bird.py:ilr --workdir=/data/runs/bird \
#     --config.task.data_dir=/data/bird/hf --config.task.db_root=/data/bird/databases \
#     --config.supervisor.model_dir=/data/models/gemma-2b \
#     --config.student.model_dir=/data/models/llama-3-70b
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
if [ ! -d .venv ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -e '.[cuda]'
fi
# Let XLA take most of the GPU memory up front (the default 75% is too little for 7B LoRA runs).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec .venv/bin/python -m ilr_jax.main "$@"
