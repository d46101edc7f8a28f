#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_fsdp_phase_c.sh   (files land in $OUT)
# Phase C (sidecar + fresh LoRA + every 4th layer unfrozen, bf16 base) on one GPU twice, from the same surgery of the
# small preset, in deterministic mode: plain, and through accelerate launch with fsdp2.yaml on 1 process (NCCL,
# sharded over one rank: the CUDA paths of the sharding, bf16 units with float32 adapters left out, a float32
# unfrozen unit, the gathered checkpoint). Prints how far apart the two runs' weights end.
set -uo pipefail
S=${OUT:-/tmp/rkl_fsdp}; W=/tmp/wf; rm -rf "$W"; mkdir -p "$S" "$W"
CLI=(--set data=stdlib+arithmetic --set max_chars_per_source=20000)
RUN=(--phase c --model "$W/surgery" --steps ${STEPS:-4} --batch-size 8 --dtype bfloat16 --deterministic
     --set seq_len=288 --set eval_interval=${STEPS:-4} --set save_interval=2 --set eval_batches=1 "${CLI[@]}")
part() { local name=$1 limit=$2; shift 2; local s=$SECONDS
  timeout "$limit" "$@" > "$S/$name.txt" 2>&1; echo "== $name: exit $? after $((SECONDS - s)) s" | tee -a "$S/summary.txt"; }
part surgery 120 python3 -m rkl surgery --model small --out "$W/surgery" "${CLI[@]}"
part plain ${LIMIT:-200} python3 -m rkl train "${RUN[@]}" --out "$W/plain"
part fsdp ${LIMIT:-200} accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 \
  -m rkl train "${RUN[@]}" --out "$W/fsdp"
python3 - "$W" <<'PY' | tee "$S/compare.txt"
import json, sys, torch
from safetensors.torch import load_file
w = sys.argv[1]
for name in ("sidecar", "lora", "unfrozen"):
    a, b = (load_file(f"{w}/{run}/{name}.safetensors") for run in ("plain", "fsdp"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"{name}: {len(a)} tensors, max |plain - fsdp| = {diff:.3g}, bitwise equal: "
          f"{all(torch.equal(a[k], b[k]) for k in a)}")
for run in ("plain", "fsdp"):
    meta = json.load(open(f"{w}/{run}/run.json"))
    print(run, {k: meta.get(k) for k in ("world_size", "fsdp", "peak_memory_mib", "step")})
PY
for f in plain fsdp; do echo "== $f"; grep -E "step [0-9]+/|validation|saved|rror" "$S/$f.txt" | tail -5; done
