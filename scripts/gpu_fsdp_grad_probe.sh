#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_fsdp_grad_probe.sh   (files land in $OUT)
# Where phase C with FSDP (1 process) and plain phase C part on a GPU: one step of each with SGD at lr 1
# (scripts/fsdp_grad_probe.py), so the saved weights differ by exactly the first step's gradients. As rkl trains on a
# GPU (bf16 base, bf16 autocast) and in float32 throughout (float32 base, no autocast, TF32 off), all in deterministic
# mode. A second plain bf16 run says how far two plain runs part (the kernels' own run-to-run differences), so a
# plain-against-FSDP difference is read beside it. The runs go one after another: run side by side on a cold Triton
# cache they timed out, and fla's autotuner may pick different kernels per process. For transformers' reference
# kernels instead of fla's (no Triton compile), remove fla's wheels BEFORE the preamble:
#   rm -f .whl/fla_core* .whl/flash_linear*; . .whl/preamble.sh; bash scripts/gpu_fsdp_grad_probe.sh
set -uo pipefail
S=${OUT:-/tmp/rkl_probe}; W=/tmp/wp; rm -rf "$W"; mkdir -p "$S" "$W"
DEADLINE=${DEADLINE:-560}  # seconds for the whole script: no part may start a run that would end past it
CLI=(--set data=${DATA:-stdlib+arithmetic} --set max_chars_per_source=20000)  # DATA, MODEL, ACCEL: for a CPU try-out
RUN=(train --phase c --model "$W/surgery" --steps 1 --batch-size 8 --deterministic --set seq_len=${SEQ:-288}
     --set eval_batches=1 --set warmup_steps=0 --set grad_clip=0 --set drift_new_tokens=4 "${CLI[@]}")
part() { local name=$1 limit=$2; shift 2; local s=$SECONDS left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "== $name: skipped, past the deadline" | tee -a "$S/summary.txt"; return; fi
  timeout "$limit" "$@" > "$S/$name.txt" 2>&1; local rc=$?
  echo "== $name: exit $rc after $((SECONDS - s)) s  $(grep -oE 'step 1/1 +loss [0-9.]+' "$S/$name.txt" | tail -1)" \
    | tee -a "$S/summary.txt"; }
plain() { part "$1" $LIMIT env "${@:3}" python3 scripts/fsdp_grad_probe.py "${RUN[@]}" --dtype "$2" \
  --out "$W/$1"; }
fsdp() { part "$1" $LIMIT env "${@:3}" accelerate launch --config_file ${ACCEL:-configs/accelerate/fsdp2.yaml} \
  --num_processes 1 scripts/fsdp_grad_probe.py "${RUN[@]}" --dtype "$2" --out "$W/$1"; }
part surgery 120 python3 -m rkl surgery --model ${MODEL:-small} --out "$W/surgery" "${CLI[@]}"
# RUNS: which runs, in order. The first run compiles fla's kernels (and their autotuning variants): FIRST_LIMIT
for run in ${RUNS:-plain_bf16 plain_bf16_again fsdp_bf16 plain_fp32 fsdp_fp32}; do
  [ "${first:-}" ] || { first=1; LIMIT=${FIRST_LIMIT:-${LIMIT:-200}}; }
  case $run in
    plain_bf16*) plain "$run" bfloat16;; fsdp_bf16*) fsdp "$run" bfloat16;;
    plain_fp32*) plain "$run" float32 PROBE_AUTOCAST=0;; fsdp_fp32*) fsdp "$run" float32 PROBE_AUTOCAST=0;;
    *) echo "unknown run $run"; exit 2;;
  esac
  LIMIT=${RUN_LIMIT:-200}
done
compare() { [ -d "$W/$2" ] && [ -d "$W/$3" ] || { echo "== $2 against $3: a run is missing" >> "$S/compare.txt"; return; }
  echo "== first-step gradients, $2 (a) against $3 (b)" >> "$S/compare.txt"
  python3 scripts/fsdp_grad_probe.py --compare "$W/surgery" "$W/$2" "$W/$3" "$1" 2>&1 | tail -4 >> "$S/compare.txt"; }
compare bfloat16 plain_bf16 plain_bf16_again; compare bfloat16 plain_bf16 fsdp_bf16; compare float32 plain_fp32 fsdp_fp32
echo; cat "$S/summary.txt" "$S/compare.txt"
