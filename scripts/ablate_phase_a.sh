#!/usr/bin/env bash
# Phase A ablations on the demo's checkpoints, every variant trained and evaluated the same way, then one table.
# Run `make demo` first (it writes checkpoints/after_surgery and the demo's eval_results/). Varies, one at a time
# against the demo's phase A (chunk_attention, edit_margin 1.4, re-decoding): the refine cell type, the edit
# margin, and stale-suffix reuse. Outputs: checkpoints/ablate/*, eval_results/ablate_*.json. About 15 min on 2 CPU cores.
set -euo pipefail
R=${RKL:-.venv/bin/rkl}
PY=${PY:-.venv/bin/python}
A=checkpoints/ablate
train_eval() {  # name, surgery folder, --set overrides...
  local name=$1 surg=$2; shift 2
  $R train --phase a --model "$surg" --out "$A/$name" "$@"
  $R eval --stage "ablate_$name" --model "$A/$name"
}
for cell in pooled per_token; do
  $R surgery --out "$A/surgery_$cell" --set refine_cell_type=$cell
  train_eval "${cell}" "$A/surgery_$cell" --set refine_cell_type=$cell
done
for margin in 0 2.8; do
  train_eval "margin_$margin" checkpoints/after_surgery --set edit_margin=$margin
done
$R eval --stage ablate_reuse --model checkpoints/phase_a --set reuse_stale_suffix=true
$PY - <<'PY'
import json, pathlib
stages = ["after_surgery", "finetuned_vanilla", "phase_a", "ablate_pooled", "ablate_per_token", "ablate_margin_0",
          "ablate_margin_2.8", "ablate_reuse"]
keys = ["arith_exact", "restore_acc_1", "restore_acc_k", "draft_acc", "draft_acc_refined", "tpot_uplift",
        "cont_mean_committed", "cont_avg_inner_steps", "cont_tpot_uplift", "cont_greedy_agree_plain"]
res = {s: json.loads(pathlib.Path(f"eval_results/{s}.json").read_text())["metrics"] for s in stages}
print("| metric | " + " | ".join(stages) + " |")
print("|---" * (len(stages) + 1) + "|")
for k in keys:
    cells = [res[s].get(k) for s in stages]
    print(f"| {k} | " + " | ".join("—" if v is None else (f"{100 * v:.1f}%" if "acc" in k or k == "arith_exact"
                                   else f"{v:.2f}") for v in cells) + " |")
PY
