#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_attention.sh   (files land in $OUT)
# SDPA with cuDNN's attention (PyTorch's first choice on an H100/H200) beside SDPA without it (rkl's setting,
# rkl.model.kernels.set_cudnn_attention), on the small preset: one cached decode step (profile_decode.py), phase A
# beside the vanilla fine-tune step (bench_phase_a.py), and batched generation with its repeat check
# (bench_generation.py). Parts run one after another with time limits, the script with a deadline.
set -uo pipefail
O=${OUT:-/tmp/rkl_attention}; S=/tmp/rkl_parts; rm -rf "$S"; mkdir -p "$O" "$S"
. scripts/gpu_parts.sh
restore_triton_cache
DEADLINE=${DEADLINE:-540}
PARTS=" ${PARTS:-decode phase_a generation} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
PHASE_A="--preset small --batch 8 --prefix 1024 --width 64 --k 4 --repeats 3 --walk-steps 8 --no-sections"
GEN="--preset small --batches ${BATCHES:-1,8,32,64} --new 128 --width 32 --k 4 --repeats 1 --repeat-check --deterministic"
if want decode; then
  for b in 8 64; do part decode_b$b 120 python3 scripts/profile_decode.py --preset small --batch $b --prefix 1024 \
    --compare-cudnn --rows 12; done; fi
want phase_a && part phase_a_off 200 python3 scripts/bench_phase_a.py $PHASE_A
want generation && part generation_off 200 python3 scripts/bench_generation.py $GEN
want phase_a && part phase_a_cudnn 150 python3 scripts/bench_phase_a.py $PHASE_A --cudnn-attention
want generation && part generation_cudnn 200 python3 scripts/bench_generation.py $GEN --cudnn-attention
save_triton_cache "$O"
for f in "$S"/*.txt; do echo "=== $f"; cat "$f"; done > "$O/log.txt"
echo; cat "$S/summary.txt"
for f in "$S"/decode_b*.txt "$S"/phase_a_*.txt "$S"/generation_*.txt; do
  [ -f "$f" ] && { echo "== $(basename "$f" .txt)"; grep -E "^\||ms per|launches|tokens/s|vanilla|rror" "$f" | tail -14; }
done
