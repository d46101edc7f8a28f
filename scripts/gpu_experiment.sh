#!/usr/bin/env bash
# A real experiment in one device call of under 10 minutes on one H200, from scratch: pretrain the `mini` preset
# (29M parameters) on the embedded corpus with 3-digit MSD-first addition, surgery, phase A, the vanilla control on
# the same token budget, eval of all four stages, compare. Usage on the device machine:
#   . .whl/preamble.sh; bash scripts/gpu_experiment.sh
# Training runs are time-boxed with SIGINT (rkl saves the last finished step on Ctrl-C, so a cut run still leaves
# a checkpoint); the vanilla control then gets the token budget phase A actually used. Results, compare.md and the
# plots are copied to $OUT; the last lines printed are the compare table.
set -uo pipefail
OUT=${OUT:-/tmp/rkl_experiment}; mkdir -p "$OUT"
W=${WORK:-/tmp/rkl_experiment_work}; rm -rf "$W"; mkdir -p "$W"
PRESET=${PRESET:-mini}
PRETRAIN_S=${PRETRAIN_S:-150}; PHASE_A_S=${PHASE_A_S:-110}; LIMIT=${LIMIT:-300}
BATCH=${BATCH:-32}; WIDTH=8; PREFIX=64   # phase A: prefixes uniform in [PREFIX/4, PREFIX] before a WIDTH-token chunk
DATA=(--set data=arithmetic+stdlib --set arithmetic_digits=3 --set max_chars_per_source=1000000)
log() { echo "== $* ($SECONDS s)" | tee -a "$OUT/summary.txt"; }
steps_done() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$1/run.json"; }

log start
timeout -s INT "$PRETRAIN_S" python3 -m rkl train --phase pretrain --model "$PRESET" --out "$W/baseline" --overwrite \
  --steps 1500 --batch-size "$BATCH" --set seq_len=256 --set lr=1e-3 --set warmup_steps=50 --set eval_interval=500 \
  --set save_interval=500 "${DATA[@]}" > "$OUT/pretrain.txt" 2>&1
log "pretrain: $(tail -3 "$OUT/pretrain.txt" | tr '\n' ' ')"
python3 -m rkl eval --stage baseline --model "$W/baseline" --limit "$LIMIT" "${DATA[@]}" --set chunk_width=$WIDTH > "$OUT/eval_baseline.txt" 2>&1
log "eval baseline: $(tail -2 "$OUT/eval_baseline.txt" | head -1)"
python3 -m rkl surgery --model "$W/baseline" --out "$W/after_surgery" "${DATA[@]}" --set chunk_width=$WIDTH > "$OUT/surgery.txt" 2>&1
log "surgery: $(tail -1 "$OUT/surgery.txt")"
python3 -m rkl eval --stage after_surgery --model "$W/after_surgery" --limit "$LIMIT" "${DATA[@]}" > "$OUT/eval_after_surgery.txt" 2>&1
log "eval after_surgery: $(tail -2 "$OUT/eval_after_surgery.txt" | head -1)"
timeout -s INT "$PHASE_A_S" python3 -m rkl train --phase a --model "$W/after_surgery" --out "$W/phase_a" --overwrite \
  --steps 600 --batch-size "$BATCH" --set seq_len=$((PREFIX + WIDTH)) --set lr_refine=1e-3 --set lr_boundary=1e-3 \
  --set warmup_steps=30 --set eval_interval=200 --set save_interval=200 --set eval_batches=2 "${DATA[@]}" \
  > "$OUT/phase_a.txt" 2>&1
A_STEPS=$(steps_done "$W/phase_a")
log "phase a ($A_STEPS steps): $(tail -3 "$OUT/phase_a.txt" | tr '\n' ' ')"
# the control: the same rows and tokens per step as phase A (mean prefix + chunk), for as many steps as phase A ran
python3 -m rkl train --phase vanilla --model "$W/baseline" --out "$W/finetuned_vanilla" --overwrite --steps "$A_STEPS" \
  --batch-size "$BATCH" --set seq_len=$(((PREFIX / 4 + PREFIX) / 2 + WIDTH)) --set warmup_steps=30 \
  --set eval_interval=200 --set save_interval=200 "${DATA[@]}" > "$OUT/vanilla.txt" 2>&1
log "vanilla: $(tail -3 "$OUT/vanilla.txt" | tr '\n' ' ')"
for stage in phase_a finetuned_vanilla; do
  python3 -m rkl eval --stage $stage --model "$W/$stage" --limit "$LIMIT" "${DATA[@]}" > "$OUT/eval_$stage.txt" 2>&1
  log "eval $stage: $(tail -2 "$OUT/eval_$stage.txt" | head -1)"
done
python3 -m rkl compare baseline after_surgery finetuned_vanilla phase_a > "$OUT/compare.txt" 2>&1
log compare
cp eval_results/*.json eval_results/*.md eval_results/*.png "$OUT/" 2>/dev/null
cp "$W"/*/run.json "$OUT/" 2>/dev/null; for s in baseline phase_a finetuned_vanilla; do cp "$W/$s/run.json" "$OUT/run_$s.json" 2>/dev/null; done
cat "$OUT/summary.txt"; cat eval_results/compare.md 2>/dev/null || cat "$OUT/compare.txt"
