#!/usr/bin/env bash
# Everything rkl measures on a GPU box, in one run (the device tool gives ~30 min a session).
# Usage on the device machine:  . .whl/preamble.sh; bash scripts/gpu_suite.sh
# Logs and tables go under $OUT (default /tmp/rkl_gpu); the last lines printed are the summary.
set -euo pipefail
OUT=${OUT:-/tmp/rkl_gpu}
mkdir -p "$OUT"
export RKL_ROOT=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

PART=${1:-all}   # bench | pipeline | eval | all
if [[ $PART == bench || $PART == all ]]; then
# 1. Promise 1 on the GPU (fla kernels, bf16): greedy generate_chunks == base.generate; inner-step cost vs prefix.
python3 scripts/bench_inner_loop.py --device cuda --dtype bfloat16 --preset tiny --check-exact 2>&1 | tee "$OUT/bench_tiny_bf16.txt"
python3 scripts/bench_inner_loop.py --device cuda --dtype bfloat16 --preset small --check-exact --repeats 5 2>&1 | tee "$OUT/bench_small_bf16.txt"

fi
if [[ $PART == pipeline || $PART == all ]]; then
# 2. The pipeline on the GPU (bf16 autocast): pretrain the small preset briefly, surgery, phase A; tokens/s from the logs.
W="$OUT/work"; mkdir -p "$W"
COMMON=(--set data=stdlib+arithmetic --set max_chars_per_source=3000000 --set eval_batches=2)
s=$SECONDS; python3 -m rkl train --phase pretrain --model small --out "$W/baseline" --steps 60 --batch-size 8 \
  --set seq_len=1024 --set lr=1e-3 --set eval_interval=30 --set log_interval=10 "${COMMON[@]}" 2>&1 | tee "$OUT/pretrain_small.txt" | tail -4
echo "pretrain wall $((SECONDS-s)) s" | tee -a "$OUT/summary.txt"
python3 -m rkl surgery --model "$W/baseline" --out "$W/after_surgery" --set chunk_width=64 2>&1 | tail -2 | tee "$OUT/surgery_small.txt"
s=$SECONDS; python3 -m rkl train --phase a --model "$W/after_surgery" --out "$W/phase_a" --steps 40 --batch-size 8 \
  --set chunk_width=64 --set seq_len=1088 --set eval_interval=20 --set log_interval=10 "${COMMON[@]}" 2>&1 | tee "$OUT/phase_a_small.txt" | tail -4
echo "phase a wall $((SECONDS-s)) s" | tee -a "$OUT/summary.txt"
python3 - "$OUT" <<'PY'
import sys, glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = sys.argv[1]
for run in ("baseline", "phase_a"):
    for d in sorted(glob.glob(f"logs/*__{run}")):  # logs/<the --out path, joined by __>
        acc = EventAccumulator(d); acc.Reload()
        tags = acc.Tags()["scalars"]
        tps = [e.value for e in acc.Scalars("train/tokens_per_s")] if "train/tokens_per_s" in tags else []
        mem = [e.value for e in acc.Scalars("train/peak_mem_gib")] if "train/peak_mem_gib" in tags else []
        line = f"{run}: median tokens/s {sorted(tps)[len(tps)//2]:.0f}, peak mem {max(mem):.2f} GiB" if tps else f"{run}: no logs"
        print(line); open(f"{out}/summary.txt", "a").write(line + "\n")
PY
fi
if [[ $PART == eval || $PART == all ]]; then
# 3. rkl eval + compare on the GPU in bf16: after_surgery must equal baseline exactly (perplexity, accuracy, greedy hash).
W="$OUT/work"; mkdir -p "$W"
# Exactness needs no trained base: a few pretrain steps make a checkpoint with a tokenizer.
# (pretrain does not read chunk_width, and a --set of a field a command does not read is refused)
DATA=(--set data=stdlib+arithmetic --set max_chars_per_source=1000000)
python3 -m rkl train --phase pretrain --model small --out "$W/baseline" --steps 5 --batch-size 8 \
  --set seq_len=1024 --set lr=1e-3 --set eval_interval=5 --set eval_batches=1 "${DATA[@]}" 2>&1 | tail -2
python3 -m rkl surgery --model "$W/baseline" --out "$W/after_surgery" "${DATA[@]}" --set chunk_width=16 2>&1 | tail -1
for stage in baseline after_surgery; do
  s=$SECONDS
  python3 -m rkl eval --stage $stage --model "$W/$stage" --dtype bfloat16 "${DATA[@]}" --set chunk_width=16 --limit 200 2>&1 | tail -1
  echo "eval $stage wall $((SECONDS-s)) s" | tee -a "$OUT/summary.txt"
done
cp eval_results/*.json "$OUT/" 2>/dev/null || true
python3 -m rkl compare baseline after_surgery > "$OUT/compare.txt" 2>&1 || true
grep -iE "warning|perplexity|arith_exact|token_acc" "$OUT/compare.txt" | head -12
rm -rf "$W"
fi
echo "== summary"; grep -h -A12 "inner step" "$OUT"/bench_*_bf16.txt 2>/dev/null | head -40 || true; cat "$OUT/summary.txt" 2>/dev/null || true
