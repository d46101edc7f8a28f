#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_static_decode.sh   (files land in $OUT)
# The draft walk eager vs CUDA-graphed (rkl.model.static_decode), small preset: the walk alone at several row counts
# (scripts/bench_static_decode.py: time, capture cost, logit difference, identical drafts), then phase A's step as the
# training loop runs it with each walk, at draft_walk_steps 1 and $G, beside the vanilla fine-tune at the same batch
# (scripts/bench_phase_a.py --compare-graph), then at batch 32 with the graphed walk. The pytest part needs `../shared/gpu/fetch-wheels.sh pytest iniconfig pluggy
# packaging` once. Parts run one after another with time limits (fla compiles on first use).
set -uo pipefail
O=${OUT:-/tmp/rkl_static_decode}; S=/tmp/rkl_parts; rm -rf "$S"; mkdir -p "$O" "$S"
. scripts/gpu_parts.sh
restore_triton_cache
DEADLINE=${DEADLINE:-560}
PRESET=${PRESET:-small}
PARTS=" ${PARTS:-test walk phase_a phase_a_b32} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
# the GPU-only test (graph replay == the static step run eagerly, bitwise, small preset; the CPU tests need a machine without
# triton); needs pytest among the carried wheels
want test && part test ${TEST_LIMIT:-150} python3 -m pytest -p no:cacheprovider -rs tests/test_static_decode.py -k "${TEST_K:-graph_replay or grouped_mm}"
want walk && part walk ${WALK_LIMIT:-300} python3 scripts/bench_static_decode.py --preset "$PRESET" --prefix 1024 \
  --width 64 --rows "${ROWS:-8,64,256}" --repeats 3
want phase_a && part phase_a ${PHASE_A_LIMIT:-300} python3 scripts/bench_phase_a.py --preset "$PRESET" --batch 8 \
  --prefix 1024 --width 64 --k 4 --repeats 3 --no-sections --compare-graph --walk-steps "${G:-8}"
# a float32 base under bf16 autocast (what `rkl train` runs on a preset): the capture is refused (grouped_mm's float32
# path, graph_blocker) and the decoder falls back to the static step run eagerly; the static layer keeps the
# snapshot's dtypes, so its drafts still equal the eager walk's
want walk_fp32 && part walk_fp32 ${WALK_LIMIT:-300} python3 scripts/bench_static_decode.py --preset "$PRESET" \
  --prefix 1024 --width 64 --rows 8,64 --repeats 3 --base-dtype float32
# where the graphed-walk step goes: each part's wall time beside its device busy time, kernel launches and syncs
want busy && part busy ${BUSY_LIMIT:-200} python3 scripts/bench_phase_a.py --preset "$PRESET" --batch 8 --prefix 1024 \
  --width 64 --k 4 --repeats 3 --device-busy
# why draft_walk_steps 8 gains little on top of the graph: the group's one walk and a step without its walk, profiled
want busy_group && part busy_group ${BUSY_LIMIT:-200} python3 scripts/bench_phase_a.py --preset "$PRESET" --batch 8 \
  --prefix 1024 --width 64 --k 4 --repeats 2 --no-sections --no-vanilla --walk-steps "${G:-8}" --device-busy
# at batch 32 the chunk passes carry 4x the tokens for the same launches: how much of the gap to vanilla is launches
want phase_a_b32 && part phase_a_b32 ${PHASE_A_LIMIT:-300} python3 scripts/bench_phase_a.py --preset "$PRESET" \
  --batch 32 --prefix 1024 --width 64 --k 4 --repeats 2 --no-sections --walk-steps "${G:-8}"
# not in the default PARTS: walk_fp32, busy, busy_group, and the 48B-A3B architecture (an H200: 91.5 GiB of weights):
# PARTS="walk_48b phase_a_48b"
want walk_48b && part walk_48b ${BIG_LIMIT:-300} python3 scripts/bench_static_decode.py --preset kimi_linear_48b_a3b \
  --prefix 512 --width 64 --rows 2,16 --repeats 2
want phase_a_48b && part phase_a_48b ${BIG_LIMIT:-300} python3 scripts/bench_phase_a.py --preset kimi_linear_48b_a3b \
  --batch 2 --prefix 512 --width 64 --k 4 --no-vanilla --no-sections --compare-graph
save_triton_cache "$O"
for f in "$S"/*.txt; do echo "=== $f"; cat "$f"; done > "$O/log.txt"
echo; cat "$S/summary.txt"
for p in test walk walk_fp32 phase_a busy busy_group phase_a_b32 walk_48b phase_a_48b; do f="$S/$p.txt"
  [ -f "$f" ] && { echo "== $(basename "$f" .txt)"; grep -E "^\||parameters|walk|vanilla|rror|passed|failed|skipped" "$f" | tail -24; }; done
