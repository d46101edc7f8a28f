#!/usr/bin/env bash
# Phase A vs the vanilla control on one GPU, small preset, bf16 autocast: training tokens/s side by side, and what
# building drafted/sampled chunks token by token costs. Usage on the device machine:
#   . .whl/preamble.sh; bash scripts/gpu_phase_a.sh        (about 10 min on one H200: more than one device call
#   allows; the first run's logs/ stayed on the warm machine and the table was read in a second call)
set -euo pipefail
W=${WORK:-/tmp/rkl_gpu_work}; mkdir -p "$W"  # not under $OUT: checkpoints need not come back
D=(--set data=stdlib+arithmetic --set max_chars_per_source=3000000 --set eval_batches=1 --set log_interval=5)
python3 -m rkl train --phase pretrain --model small --out "$W/baseline" --steps 15 --batch-size 8 \
  --set seq_len=1024 --set lr=1e-3 --set eval_interval=15 "${D[@]}" 2>&1 | tail -1
python3 -m rkl surgery --model "$W/baseline" --out "$W/after_surgery" --set chunk_width=64 2>&1 | tail -1
for w in 64 16; do
  python3 -m rkl train --phase a --model "$W/after_surgery" --out "$W/phase_a_w$w" --steps 20 --batch-size 8 \
    --set chunk_width=$w --set seq_len=$((1024 + w)) --set eval_interval=20 "${D[@]}" 2>&1 | tail -1
done
python3 - "$W" <<'PY'
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for run in ("baseline", "phase_a_w64", "phase_a_w16"):  # baseline = the pretrain run: forward+backward at T = 1024
    acc = EventAccumulator(glob.glob(f"logs/*{run}")[0]); acc.Reload()  # logs/<the --out path, joined by __>
    tps = sorted(e.value for e in acc.Scalars("train/tokens_per_s"))[1:]  # drop the first (warm-up) step
    mem = max(e.value for e in acc.Scalars("train/peak_mem_gib"))
    print(f"{run}: median tokens/s {tps[len(tps) // 2]:.0f}, peak {mem:.1f} GiB")
PY
