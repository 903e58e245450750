#!/usr/bin/env bash
# One scaled GSM8K ILR round on one accelerator, for stage times (at most about 5 minutes on one
# H200): configs/gsm8k.py:ilr with 1 round, TRAIN_ROWS train and TEST_ROWS test rows, bf16, and
# random-weight HF checkpoints of the real shapes (Gemma-2B supervisor and evaluator, Mistral-7B
# student) that it writes itself with a character-level tokenizer of each vocabulary
# (`python -m ilr_jax.timing write`). `--config.debug.timing=True` keeps every label and decodes
# every sequence to its length limit: accuracies are meaningless, times realistic. Prints each
# stage's wall time and the extrapolated full 6-round run (`python -m ilr_jax.timing report`:
# every stage scaled by 7473 / TRAIN_ROWS, round stages times 6; an overestimate for test-set
# evaluation, which scales by 1319 / TEST_ROWS).
#
#   launch/round_accelerator.sh [OUT_DIR]        # default $OUT, else /tmp/ilr_round_accelerator
#
# Needs the GSM8K dataset as a datasets.save_to_disk folder: DATA_DIR (default
# ../shared/data/gsm8k). Overrides: SUPERVISOR (preset, gemma-2b), STUDENT (mistral-7b), DTYPE
# (bfloat16), TRAIN_ROWS (512), TEST_ROWS (128), MAX_NEW (256 new tokens), LIMIT_S (290), EXTRA
# (more --config flags). CPU dry run (tests/test_launch.py): SUPERVISOR=tiny STUDENT=tiny
# DTYPE=float32 TRAIN_ROWS=16 TEST_ROWS=4 MAX_NEW=4 with small batch sizes in EXTRA.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/ilr_round_accelerator}}"
mkdir -p "$out"
sup="${SUPERVISOR:-gemma-2b}" stu="${STUDENT:-mistral-7b}" dtype="${DTYPE:-bfloat16}"
train="${TRAIN_ROWS:-512}" test="${TEST_ROWS:-128}" new="${MAX_NEW:-256}"
data="${DATA_DIR:-../shared/data/gsm8k}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
[[ -d "$data" ]] || { echo "GSM8K data folder $data is absent (set DATA_DIR)" >&2; exit 2; }
python3 -m ilr_jax.timing write "$sup" "$out/models/$sup" "$dtype" || exit $?
python3 -m ilr_jax.timing write "$stu" "$out/models/$stu" "$dtype" || exit $?
flags=()
for role in supervisor student; do
  flags+=("--config.$role.dtype=$dtype" "--config.$role.param_dtype=$dtype")
done
read -r -a extra <<<"${EXTRA:-}"
timeout "${LIMIT_S:-290}" python3 -m ilr_jax.main --config=configs/gsm8k.py:ilr \
  --workdir="$out/run" --config.num_rounds=1 --config.debug.timing=True \
  --config.task.data_dir="$data" --config.task.train_limit="$train" \
  --config.task.test_limit="$test" --config.task.max_new_tokens="$new" \
  --config.supervisor.model_dir="$out/models/$sup" --config.student.model_dir="$out/models/$stu" \
  "${flags[@]}" "${extra[@]}" 2>&1 | tee "$out/run.log"
status=${PIPESTATUS[0]}
python3 -m ilr_jax.timing report "$out/run.log" "$train" 1 | tee "$out/times.jsonl"
exit "$status"
