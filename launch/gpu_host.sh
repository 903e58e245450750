#!/usr/bin/env bash
# Prepare a multi-GPU host (CUDA 12) and run the pipeline on it; run it on the host itself.
#
#   launch/gpu_host.sh --config=configs/gsm8k.py:compare --workdir=/data/runs/gsm8k \
#     --config.supervisor.model_dir=/data/models/gemma-2b \
#     --config.student.model_dir=/data/models/mistral-7b
#   launch/gpu_host.sh --config=configs/bird.py:ilr --workdir=/data/runs/bird \
#     --config.task.data_dir=/data/bird/hf --config.task.db_root=/data/bird/databases \
#     --config.supervisor.model_dir=/data/models/gemma-2b \
#     --config.student.model_dir=/data/models/llama-3-70b
#
# One process drives every GPU of the host. Several hosts: one process per host, each with
# --distributed; under SLURM (JAX reads SLURM_NTASKS / SLURM_PROCID / the node list itself):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_host.sh --distributed ...
# and elsewhere give each host --coordinator_address=HOST0:PORT --num_processes=N --process_id=I.
#
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
cd "$REPO"
if [ ! -d .venv ] || [ -n "${DRY_RUN:-}" ]; then
  run python3 -m venv .venv
  run .venv/bin/pip install -q -U pip
  run .venv/bin/pip install -q -e '.[cuda]'
fi
# Let XLA take most of the GPU memory up front (the default 75% is too little for 7B LoRA runs).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [ -n "${DRY_RUN:-}" ]; then
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  run .venv/bin/python -m ilr_jax.main "$@"
else
  exec .venv/bin/python -m ilr_jax.main "$@"
fi
