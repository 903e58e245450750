#!/usr/bin/env bash
# The accelerator figures in one prepared run (one H100/H200, at most about 5 minutes): JSON lines
# from `python -m ilr_jax.bench`, random weights, bf16, each run bounded by LIMIT_S seconds.
#   sft_gemma2b        sft_step, Gemma-2B full fine-tune, SFT_BATCH x 512 tokens (mfu field)
#   sft_mistral7b_lora sft_step_lora, Mistral-7B LoRA r64, SFT_BATCH x 512 tokens (mfu)
#   dpo_mistral7b_lora dpo_step_lora, Mistral-7B LoRA r64, DPO_BATCH sequences of 512 (mfu)
#   decode_rowsN       generate_greedy, Mistral-7B, N rows, prompt 256, 256 new tokens
#                      (tokens_per_s / bw_bound_tokens_per_s: the fraction of the HBM bound)
#   beam4_rowsN        generate_beam4, Mistral-7B, N / 4 prompts of 4 beams
#   evaluator_gemma2b  classify_batched, Gemma-2B 2-class score head (items_per_s: prompts/s;
#                      a pair is two prompts)
#
#   launch/bench_accelerator.sh [OUT_DIR]        # default $OUT, else /tmp/ilr_bench_accelerator
#
# Runs from the checkout with the machine's jax, flax and transformers. Overrides: GEMMA, MISTRAL
# (shapes), DTYPE, SFT_BATCH (default 16), DPO_BATCH (8), SEQ_LEN (512), DECODE_LEN (256),
# ROWS ("64 256"), REMAT (full), MIN_REPS (5), LIMIT_S (60), ONLY (space-separated run names).
# CPU dry run (tests/test_launch.py): GEMMA=bench-tiny MISTRAL=bench-tiny DTYPE=float32
# SFT_BATCH=2 DPO_BATCH=2 SEQ_LEN=16 DECODE_LEN=8 ROWS=4 MIN_REPS=1. Records already written to
# OUT_DIR stay when a later run fails or times out; the exit status is the last failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/ilr_bench_accelerator}}"
mkdir -p "$out"
gemma="${GEMMA:-gemma-2b}" mistral="${MISTRAL:-mistral-7b}" dtype="${DTYPE:-bfloat16}"
seq="${SEQ_LEN:-512}" dec="${DECODE_LEN:-256}" reps="${MIN_REPS:-5}" limit="${LIMIT_S:-60}"
remat="${REMAT:-full}" only="${ONLY:-}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
status=0
run() {  # run NAME SHAPE ARCH WORKLOAD BATCH SEQ_LEN [extra flags]
  if [[ -n "$only" && " $only " != *" $1 "* ]]; then return; fi
  timeout "$limit" python3 -m ilr_jax.bench --workloads="$4" --shape="$2" --arch="$3" \
    --dtype="$dtype" --batch="$5" --seq_len="$6" --min_reps="$reps" --max_reps="$reps" \
    --min_time=0 --warmup=1 --out="$out/$1.jsonl" "${@:7}" >"$out/$1.log" 2>&1 \
    || { status=$?; echo "$1: exit $status" >&2; }
  tail -n 2 "$out/$1.log"
}
run sft_gemma2b "$gemma" gemma sft_step "${SFT_BATCH:-16}" "$seq" --remat="$remat"
run sft_mistral7b_lora "$mistral" mistral sft_step_lora "${SFT_BATCH:-16}" "$seq" --remat="$remat"
run dpo_mistral7b_lora "$mistral" mistral dpo_step_lora "${DPO_BATCH:-8}" "$seq" --remat="$remat"
read -r -a rows <<<"${ROWS:-64 256}"
for r in "${rows[@]}"; do
  run "decode_rows$r" "$mistral" mistral generate_greedy "$r" "$dec"
done
run "beam4_rows${rows[0]}" "$mistral" mistral generate_beam4 "$((rows[0] / 4))" "$dec"
run evaluator_gemma2b "$gemma" gemma classify_batched 32 "$seq"
cat "$out"/*.jsonl > "$out/all.jsonl" 2>/dev/null
exit "$status"
