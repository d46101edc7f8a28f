#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_expert_lora.sh   (files land in $OUT)
# LoRA on the routed experts at the 48B-A3B widths, rkl.model.expert_lora (side products) beside peft's own forward
# (a merged stack per forward): one MoE layer side by side (scripts/check_expert_lora.py: differences, memory, time);
# phase C cut to 8 decoder layers, which ran out of memory with peft's forward (docs/benchmarks.md); phase B cut to 4
# layers with each forward in its own process; and phases B and A on the whole 48B architecture. The
# parts run one after another, each with a time limit, the script with a deadline (fla compiles on first use).
set -uo pipefail
O=${OUT:-/tmp/rkl_expert_lora}; S=/tmp/rkl_parts; rm -rf "$S"; mkdir -p "$O" "$S"
. scripts/gpu_parts.sh
restore_triton_cache  # Triton's compiled kernels travel between fresh machines (.triton_carry/ carried, $OUT back)
DEADLINE=${DEADLINE:-560}
BIG=(python3 scripts/bench_refine_step.py --preset kimi_linear_48b_a3b --prefix 512 --width 64 --settings off)
# PARTS picks parts by name, in this order; phase C's first step compiles fla's float32 kernels too (minutes)
PARTS=" ${PARTS:-one_moe_layer phase_b_4_layers phase_c_8_layers phase_b_48b phase_a_48b} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
want one_moe_layer && part one_moe_layer 90 python3 scripts/check_expert_lora.py --preset kimi_linear_48b_a3b --tokens 1024
if want phase_b_4_layers; then
  part 48b_4_layers_phase_b_rkl 60 "${BIG[@]}" --layers 4 --phase b --batch 2 --repeats 3
  part 48b_4_layers_phase_b_peft 60 "${BIG[@]}" --layers 4 --phase b --batch 2 --repeats 3 --peft-expert-forward
fi
want phase_c_8_layers && part 48b_8_layers_phase_c_batch_2 ${C_LIMIT:-400} "${BIG[@]}" --layers 8 --phase c --batch 2 \
  --repeats 2 ${MEMORY_BREAKDOWN:+--memory-breakdown}
want phase_b_48b && part 48b_phase_b_batch_2 ${FULL_LIMIT:-200} "${BIG[@]}" --phase b --batch 2 --repeats 2
# larger batches, gradient checkpointing (rkl's: each inner step recomputed in backward) off and on
for b in ${B_BATCHES:-8 16}; do for gc in false true; do want "phase_b_48b_batch_$b" || continue
  part "48b_phase_b_batch_${b}_checkpointing_$gc" ${BATCH_LIMIT:-75} "${BIG[@]}" --phase b --batch "$b" --repeats 1 \
    --set gradient_checkpointing=$gc; done; done
for b in ${C_BATCHES:-4 8}; do for gc in false true; do want "phase_c_8_layers_batch_$b" || continue
  part "48b_8_layers_phase_c_batch_${b}_checkpointing_$gc" ${BATCH_LIMIT:-75} "${BIG[@]}" --layers 8 --phase c \
    --batch "$b" --repeats 1 --set gradient_checkpointing=$gc; done; done
want phase_a_48b && part 48b_phase_a_batch_2 ${FULL_LIMIT:-200} "${BIG[@]}" --phase a --batch 2 --repeats 2
save_triton_cache "$O"
for f in "$S"/*.txt; do echo "=== $f"; cat "$f"; done > "$O/log.txt"
echo; cat "$S/summary.txt"
for f in "$S"/one_moe_layer.txt "$S"/48b_*.txt; do
  [ -f "$f" ] && { echo "== $(basename "$f" .txt)"; grep -E "^\||^phase|^one|^output|ratio|warm|rror|memory" "$f" | tail -40; }; done
