#!/usr/bin/env bash
# Data parallel on 2 GPUs against 1, one command (needs 2 GPUs):
#   . .whl/preamble.sh; bash scripts/gpu_data_parallel.sh                 (pretrain, small preset, bf16 autocast)
#   . .whl/preamble.sh; PHASE=a DTYPE=bfloat16 bash scripts/gpu_data_parallel.sh
#       (phase A from a surgery of the preset; bf16 weights, so the draft walk runs as a CUDA graph)
# Three runs: 1 GPU at batch B, 2 GPUs at batch B each (same per-GPU batch: the tokens/s ratio), and 1 GPU at batch
# 2B (same global batch as the 2-GPU run: its validation curve should match). Prints median global tokens/s (steps 3
# onward), the validation curves and the largest gap between the two same-global-batch curves.
# On a CPU (to check the script, not to time it):
#   MODEL=tiny SEQ=24 STEPS=6 B=2 CHARS=30000 ONE="" TWO="python3 -m torch.distributed.run --nproc_per_node 2" \
#   PHASE=a bash scripts/gpu_data_parallel.sh
set -euo pipefail
W=${DP_WORK:-/tmp/rkl_dp}; mkdir -p "$W"
PHASE=${PHASE:-pretrain}; MODEL=${MODEL:-small}; STEPS=${STEPS:-12}; B=${B:-8}; SEQ=${SEQ:-1024}; CHARS=${CHARS:-400000}
[ "$STEPS" -ge 3 ] || { echo "STEPS must be at least 3 (the median tokens/s skips two warm-up steps)" >&2; exit 2; }
ONE=${ONE-CUDA_VISIBLE_DEVICES=0}
TWO=${TWO:-python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
  --dynamo_backend no}
failed() { echo "$1 failed; the end of $W/$1.log:" >&2; tail -30 "$W/$1.log" >&2; exit 1; }
log_dir() { python3 -c 'import sys; from rkl.paths import run_log_dir; print(run_log_dir(sys.argv[1]))' "$W/$1"; }
FROM=$MODEL
if [ "$PHASE" != pretrain ]; then  # the recursive phases start from a surgery folder (random weights will do)
  rm -rf "$W/surgery"
  python3 -m rkl surgery --model "$MODEL" --out "$W/surgery" --set data=stdlib+arithmetic \
    --set max_chars_per_source="$CHARS" > "$W/surgery.log" 2>&1 || failed surgery
  FROM=$W/surgery
fi
A=(train --phase "$PHASE" --model "$FROM" --steps "$STEPS" --set seq_len="$SEQ" --set data=stdlib+arithmetic
   --set max_chars_per_source="$CHARS" --set eval_interval=$(( STEPS / 3 > 0 ? STEPS / 3 : 1 )) --set eval_batches=2
   --set log_interval=1 --set save_interval=1000 --overwrite ${DTYPE:+--dtype "$DTYPE"})
for run in dp1 dp2 dp1_global; do rm -rf "$(log_dir $run)"; done  # rkl's TensorBoard folders: no older curves
run1() { env $ONE python3 -m rkl "${A[@]}" --batch-size "$1" --out "$W/$2" > "$W/$2.log" 2>&1 || failed "$2"
  tail -1 "$W/$2.log"; }
run1 "$B" dp1
$TWO -m rkl "${A[@]}" --batch-size "$B" --out "$W/dp2" > "$W/dp2.log" 2>&1 || failed dp2; tail -1 "$W/dp2.log"
grep -q '"world_size": 2' "$W/dp2/run.json" || { echo "the 2-process run did not run on 2 processes" >&2; exit 1; }
run1 $(( 2 * B )) dp1_global
WORK_DIR=$W B=$B python3 - <<'PY'
import os
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from rkl.paths import run_log_dir
w, b = os.environ["WORK_DIR"], int(os.environ["B"])
def scalars(run, tag):
    acc = EventAccumulator(str(run_log_dir(f"{w}/{run}"))); acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]
rows = {}
print("\n| run | processes | batch per process | global batch | median global tokens/s | val/loss |")
print("|---|---|---|---|---|---|")
for run, procs, per in (("dp1", 1, b), ("dp2", 2, b), ("dp1_global", 1, 2 * b)):
    tps = sorted(v for _, v in scalars(run, "train/tokens_per_s")[2:])  # the first steps warm up
    rows[run] = (tps[len(tps) // 2], scalars(run, "val/loss"))
    print(f"| {run} | {procs} | {per} | {procs * per} | {rows[run][0]:,.0f} | "
          f"{', '.join(f'{v:.4f}' for _, v in rows[run][1])} |")
print(f"\n2 processes / 1 at the same per-process batch: {rows['dp2'][0] / rows['dp1'][0]:.2f}x global tokens/s")
gap = max(abs(a - c) for (_, a), (_, c) in zip(rows["dp2"][1], rows["dp1_global"][1]))
print(f"same global batch ({2 * b}), 2 processes against 1: largest val/loss gap {gap:.2e} over "
      f"{len(rows['dp2'][1])} evaluations")
PY
