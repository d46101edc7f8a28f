#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_fsdp_grad_probe.sh   (files land in $OUT)
# Where phase C with FSDP (1 process) and plain phase C part on a GPU: one step of each with SGD at lr 1
# (scripts/fsdp_grad_probe.py), so the saved weights differ by exactly the first step's gradients. Twice: as rkl trains
# on a GPU (bf16 base, bf16 autocast) and in float32 throughout (float32 base, no autocast, TF32 off). All four
# runs in deterministic mode. For transformers' reference kernels instead of fla's (no Triton compile), remove fla's
# wheels BEFORE the preamble: rm -f .whl/fla_core* .whl/flash_linear*; . .whl/preamble.sh; bash ...
set -uo pipefail
S=${OUT:-/tmp/rkl_probe}; W=/tmp/wp; rm -rf "$W"; mkdir -p "$S" "$W"
CLI=(--set data=${DATA:-stdlib+arithmetic} --set max_chars_per_source=20000)  # DATA, MODEL, ACCEL: for a CPU try-out
RUN=(train --phase c --model "$W/surgery" --steps 1 --batch-size 8 --deterministic --set seq_len=${SEQ:-288}
     --set eval_batches=1 --set warmup_steps=0 --set grad_clip=0 --set drift_new_tokens=4 "${CLI[@]}")
part() { local name=$1 limit=$2; shift 2; local s=$SECONDS
  timeout "$limit" "$@" > "$S/$name.txt" 2>&1
  echo "== $name: exit $? after $((SECONDS - s)) s" | tee -a "$S/summary.txt"; }
part surgery 120 python3 -m rkl surgery --model ${MODEL:-small} --out "$W/surgery" "${CLI[@]}"
# the four runs at once (each is small beside the GPU; most of a one-step run is its first step's warm-up)
for mode in bfloat16 float32; do
  if [ "$mode" = float32 ]; then probe=(env PROBE_AUTOCAST=0); port=29512; else probe=(env); port=29511; fi
  part "plain_$mode" ${LIMIT:-400} "${probe[@]}" python3 scripts/fsdp_grad_probe.py "${RUN[@]}" \
    --dtype "$mode" --out "$W/plain_$mode" &
  part "fsdp_$mode" ${LIMIT:-400} "${probe[@]}" accelerate launch \
    --config_file ${ACCEL:-configs/accelerate/fsdp2.yaml} --num_processes 1 --main_process_port $port \
    scripts/fsdp_grad_probe.py "${RUN[@]}" --dtype "$mode" --out "$W/fsdp_$mode" &
done
wait
for mode in bfloat16 float32; do
  echo "== $mode: first-step gradients, plain (a) against FSDP (b)" | tee -a "$S/compare.txt"
  python3 scripts/fsdp_grad_probe.py --compare "$W/surgery" "$W/plain_$mode" "$W/fsdp_$mode" "$mode" 2>&1 \
    | tail -4 | tee -a "$S/compare.txt"
done
