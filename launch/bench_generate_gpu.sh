#!/usr/bin/env bash
# The sampler's accelerator figures in one prepared run: mistral-7b with random weights in bf16,
# prompts of 256 tokens, exactly 256 new tokens, greedy and sampling at 64 and 256 rows, beam
# search (4 beams) at 16 and 64 prompts (64 and 256 rows). Each JSON record carries tokens_per_s
# and, on a known GPU (ilr_jax/bench/generate_workloads.py, HBM_BYTES_PER_S),
# bw_bound_tokens_per_s: the ratio of the two is the fraction of the memory-bandwidth bound reached.
#
#   launch/bench_generate_gpu.sh [OUT_DIR]       # default $OUT, else /tmp/ilr_bench_generate
#
# The project needs no install here: it runs from the checkout with the machine's jax, flax and
# transformers (the benchmark imports nothing else). SHAPE, ARCH, DTYPE, ROWS, BEAM_PROMPTS,
# SEQ_LEN, MIN_REPS and LIMIT_S override the defaults (a CPU dry run: SHAPE=bench-tiny
# DTYPE=float32 ROWS=4 BEAM_PROMPTS=1 SEQ_LEN=8 MIN_REPS=2). One run of `python -m ilr_jax.bench`
# per row count and method group, each bounded by LIMIT_S seconds (default 140: the four runs fit
# one 600 s command), so that one slow case cannot take the others' time; records already written
# to OUT_DIR stay. Figures: docs/PERFORMANCE.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/ilr_bench_generate}}"
mkdir -p "$out"
shape="${SHAPE:-mistral-7b}" arch="${ARCH:-mistral}" dtype="${DTYPE:-bfloat16}"
seq="${SEQ_LEN:-256}" reps="${MIN_REPS:-10}" limit="${LIMIT_S:-140}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
status=0
run() {  # run NAME BATCH WORKLOADS
  timeout "$limit" python3 -m ilr_jax.bench --workloads="$3" --shape="$shape" --arch="$arch" \
    --dtype="$dtype" --batch="$2" --seq_len="$seq" --min_reps="$reps" --min_time=0 \
    --out="$out/$1.jsonl" >"$out/$1.log" 2>&1 || { status=$?; echo "$1: exit $status" >&2; }
  tail -n 4 "$out/$1.log"
}
read -r -a rows <<<"${ROWS:-64 256}"
read -r -a beams <<<"${BEAM_PROMPTS:-16 64}"
for i in "${!rows[@]}"; do
  run "generate_rows${rows[$i]}" "${rows[$i]}" generate_greedy,generate_sample
  run "beam4_rows$((4 * beams[$i]))" "${beams[$i]}" generate_beam4
done
exit "$status"
