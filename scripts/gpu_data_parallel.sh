#!/usr/bin/env bash
# Data-parallel pretrain throughput: 1 GPU vs 2 GPUs at the same per-GPU batch (small preset, bf16 autocast).
#   . .whl/preamble.sh; bash scripts/gpu_data_parallel.sh        (needs 2 GPUs)
set -euo pipefail
W=${WORK:-/tmp/rkl_dp}; mkdir -p "$W"
A=(train --phase pretrain --model small --steps 12 --batch-size 8 --set seq_len=1024 --set lr=1e-3
   --set data=stdlib+arithmetic --set max_chars_per_source=400000 --set eval_interval=12 --set eval_batches=1
   --set log_interval=1 --set save_interval=1000)
CUDA_VISIBLE_DEVICES=0 python3 -m rkl "${A[@]}" --out "$W/dp1" 2>&1 | tail -1
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m rkl "${A[@]}" --out "$W/dp2" 2>&1 | tail -1
python3 - <<'PY'
import glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
rates = {}
for run in ("dp1", "dp2"):
    acc = EventAccumulator(glob.glob(f"logs/*{run}")[0]); acc.Reload()  # logs/<the --out path, joined by __>
    tps = sorted(e.value for e in acc.Scalars("train/tokens_per_s")[2:])  # the first steps warm up
    loss = [round(e.value, 4) for e in acc.Scalars("val/loss")]
    rates[run] = tps[len(tps) // 2]
    print(f"{run}: median tokens/s {rates[run]:.0f} (global), val/loss {loss}")
print(f"2 GPUs / 1 GPU at the same per-GPU batch: {rates['dp2'] / rates['dp1']:.2f}x")
PY
