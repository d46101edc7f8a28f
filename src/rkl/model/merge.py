"""Folding LoRA adapters into their base weights for evaluation (`rkl eval --merge-lora`).

Unmerged, every adapted layer runs its base matmul plus a low-rank side product with float32 casts around it
(rkl.model.adapters keeps the adapters in float32); phase B's plain greedy decoding cost 2.3x the baseline's time per
token on a GPU. Merged, W += s B A once, in W's own dtype, and each layer runs its base weight alone. In a bf16 base the
merged weight is rounded to bf16, so merged results can differ from the unmerged (as trained) ones: merging is opt-in,
and every result records which of the two it measured (`lora_record`).

peft does the folding: `BaseTunerLayer.merge()` on every adapted layer. That covers the routed experts: each fused
parameter has its own `ParamWrapper` (down_proj's wraps gate_up_proj's), whose merge adds the [experts, out, in]
delta to the parameter in place (built whole, in float32, once per parameter: a transient the size of one stack).
Once both are merged, rkl.model.expert_lora's forward hands over to peft's, which calls the experts' own forward on
the merged parameters with no parametrization and no side product.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


def adapted_layers(base: torch.nn.Module) -> list[BaseTunerLayer]:
    """Every peft-adapted layer of `base`: LoRA Linears and the experts' ParamWrappers (the inner one too)."""
    return [m for m in base.modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(base: torch.nn.Module) -> int:
    """Fold every LoRA adapter of `base` into its base weight, in place; return how many layers were merged (0: no
    LoRA, nothing done). Not undone: the model is for inference from here on (peft would unmerge on
    `disable_adapters`, which rkl never calls)."""
    layers = adapted_layers(base)
    with torch.no_grad():
        for layer in layers:
            layer.merge()
    unmerged = [type(layer).__name__ for layer in layers if not layer.merged]
    # a layer left unmerged would still run its side product, and its results would be recorded as merged
    if unmerged:
        raise RuntimeError(f"peft left {len(unmerged)} adapted layers unmerged: {unmerged[:3]}")
    return len(layers)


def lora_record(base: torch.nn.Module) -> dict:
    """What eval results record about the LoRA they measured: how many adapted layers the base has (0: no LoRA) and
    whether their adapters were folded into the base weights."""
    layers = adapted_layers(base)
    return {"lora_layers": len(layers), "lora_merged": bool(layers) and all(layer.merged for layer in layers)}


def merged_name(name: str, record: dict) -> str:
    """The name a result of `record` (lora_record's) is saved under: a merged run gets its own, so it never replaces
    the stage's unmerged (as trained) result."""
    return f"{name}_merged" if record["lora_merged"] else name
