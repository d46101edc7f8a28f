#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_draft_walk.sh   (files land in $OUT)
# Phase A with the training chunks of G steps drafted in one batched walk (draft_walk_steps = G) beside each step
# drafting its own (scripts/bench_phase_a.py --walk-steps G): on the whole 48B-A3B architecture (batch 2, the
# largest phase-A batch without checkpointing is 16), then on the small preset beside the vanilla fine-tune at the
# same batch (SMALL_SECTIONS= also times the parts of one step). Parts run one after another with time limits, the script with a deadline (fla compiles on first use).
set -uo pipefail
O=${OUT:-/tmp/rkl_draft_walk}; S=/tmp/rkl_parts; rm -rf "$S"; mkdir -p "$O" "$S"
. scripts/gpu_parts.sh
restore_triton_cache
DEADLINE=${DEADLINE:-560}
G=${G:-8}  # or a list: G=8,32
PARTS=" ${PARTS:-48b small} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
want 48b && part 48b_walk ${BIG_LIMIT:-260} python3 scripts/bench_phase_a.py --preset kimi_linear_48b_a3b --batch 2 \
  --prefix 512 --width 64 --k 4 --no-vanilla --no-sections --walk-steps "$G"
want small && part small_walk ${SMALL_LIMIT:-330} python3 scripts/bench_phase_a.py --preset small --batch 8 \
  --prefix 1024 --width 64 --k 4 --repeats 3 --walk-steps "$G" ${SMALL_SECTIONS---no-sections}
save_triton_cache "$O"
for f in "$S"/*.txt; do echo "=== $f"; cat "$f"; done > "$O/log.txt"
echo; cat "$S/summary.txt"
for f in "$S"/48b_walk.txt "$S"/small_walk.txt; do
  [ -f "$f" ] && { echo "== $(basename "$f" .txt)"; grep -E "^\||parameters|ratio|vanilla|rror|memory" "$f" | tail -20; }; done
