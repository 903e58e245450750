#!/usr/bin/env bash
# The CPU science run: configs/arith.py:compare,all (the eight methods; CONFIG= picks another
# arg) for several seeds, one workdir each, then one report with mean and spread over the seeds
# (results.jsonl, report.md, accuracy.png in OUT). docs/RESULTS.md's 5-seed run:
#
#   launch/arith_seeds.sh /tmp/arith_seeds 0 1 2 3 4 [-- extra --config.x=y flags]
#
# Each seed resumes its own workdir when rerun. Run time: see docs/RESULTS.md.
set -euo pipefail
OUT="${1:?usage: arith_seeds.sh OUT SEED... [-- FLAGS...]}"
shift
SEEDS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SEEDS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
PY="${PYTHON:-python}"
CONFIG="${CONFIG:-configs/arith.py:compare,all}"
DIRS=()
for s in "${SEEDS[@]}"; do
  # One compilation cache for all seeds: their programs have the same shapes.
  "$PY" -m ilr_jax.main --config="$CONFIG" --workdir="$OUT/seed_$s" \
    --config.seed="$s" --config.compile_cache_dir="$OUT/jax_cache" "$@"
  DIRS+=("$OUT/seed_$s")
done
"$PY" -m ilr_jax.report --workdirs="$(IFS=,; echo "${DIRS[*]}")" --out="$OUT"
