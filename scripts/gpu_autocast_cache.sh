#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_autocast_cache.sh   (files land in $OUT)
# What training with autocast's weight-cast cache off costs (rkl.train.loop.AUTOCAST: the cache lost FSDP-sharded
# weights' gradients), one training step as the loop runs it, cache off and on interleaved; and phase C's measured
# memory at the 48B-A3B widths on one GPU, cut to 8 decoder layers (scripts/bench_refine_step.py). The parts run one
# after another (fla compiles its kernels on first use, once per process); each has a time limit and the script a
# deadline.
set -uo pipefail
S=${OUT:-/tmp/rkl_cache}; mkdir -p "$S"
DEADLINE=${DEADLINE:-570}
. scripts/gpu_parts.sh
SMALL=(python3 scripts/bench_refine_step.py --preset small --batch 8 --prefix 256 --width 32 --repeats 5)
BIG=(python3 scripts/bench_refine_step.py --preset kimi_linear_48b_a3b --layers 8 --phase c --prefix 512 --width 64
     --repeats 3 --memory-breakdown)
# BIG_ONLY=1: only the 48B widths, and there only how rkl trains (cache off): their warm-up compiles for minutes
if [ -z "${BIG_ONLY:-}" ]; then
  part small_phase_c ${SMALL_LIMIT:-200} "${SMALL[@]}" --phase c
  part small_phase_a ${SMALL_LIMIT:-150} "${SMALL[@]}" --phase a
else BIG+=(--settings off); fi
part 48b_8_layers_phase_c_batch_2 ${BIG_LIMIT:-240} "${BIG[@]}" --batch 2 \
  || part 48b_8_layers_phase_c_batch_1 ${BIG_LIMIT:-240} "${BIG[@]}" --batch 1
echo; cat "$S/summary.txt"
for f in "$S"/small_phase_c.txt "$S"/small_phase_a.txt "$S"/48b_*.txt; do
  [ -f "$f" ] && { echo "== $(basename "$f" .txt)"; grep -E "^\||^phase|ratio|warm|rror" "$f" | tail -45; }; done
