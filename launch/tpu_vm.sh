#!/usr/bin/env bash
# Prepare a Cloud TPU VM (every worker of a slice) and run the pipeline on it.
#
# Run from your machine; TPU_NAME and ZONE name an existing TPU VM, the repo is copied to every
# worker, and the same command runs on all of them (multi-host: --distributed; JAX finds the
# coordinator and each worker's process id from the TPU metadata). WORKDIR must be a path every
# worker sees the same way (a mounted bucket or shared disk); models must be there too.
#
#   TPU_NAME=my-v4-8 ZONE=us-central2-b launch/tpu_vm.sh \
#     --config=configs/gsm8k.py:compare --workdir=/mnt/runs/gsm8k \
#     --config.supervisor.model_dir=/mnt/models/gemma-2b \
#     --config.student.model_dir=/mnt/models/mistral-7b
#
# DRY_RUN=1 prints the commands (and the script every worker runs) instead of running them.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
ARGS="$(printf ' %q' "$@")"
WORKER_SCRIPT="
  set -e
  cd ~/ilr_jax_repo
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q -U pip && pip install -q -e '.[tpu]'
  python -m ilr_jax.main --distributed $ARGS
"
run gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$REPO" "$TPU_NAME":~/ilr_jax_repo
if [ -n "${DRY_RUN:-}" ]; then
  echo "# every worker of $TPU_NAME runs:"
  echo "$WORKER_SCRIPT"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$WORKER_SCRIPT"
