"""FSDP2 for the frozen base: each process keeps 1/N of every decoder layer, all-gathered only while it runs.

`accelerate launch --config_file configs/accelerate/fsdp2.yaml -m rkl train --phase a` asks for it: accelerate
exports ACCELERATE_USE_FSDP from the file, also from a copy with `use_cpu: true`, as the tests launch it. (The `--cpu`
flag starts a single process without it.) rkl does the sharding itself with torch's `fully_shard`, one unit per
decoder layer, instead of `accelerator.prepare`. The phases call their models' own methods (prefix pass, draft walk,
K inner steps through hooks), not one module's forward, so no single wrapper could see them. The sharding is what
saves memory at 48B (98 GB of bf16 weights, a quarter per GPU on 4). The embeddings, the final norm and the LM head
stay whole on every process, because rkl calls them directly.

Phase A only, where every trainable tensor lives outside the base (the sidecar): its gradients are all-reduced by the
training loop as in data parallel, and its optimizer state is the only one. Phases B and C train tensors inside the
sharded layers (LoRA, unfrozen layers), and pretrain and vanilla train all of the base; those are refused, as is a
phase A with LoRA or unfrozen layers.

Every process must run each layer the same number of times, because each run all-gathers it. The training paths
keep to that: the draft walk is W - 1 decode steps on every process, training runs all K inner steps, and
validation runs the same batches everywhere.

What it costs, not yet measured on GPUs: each use of a layer all-gathers it, with no prefetch. In one phase-A step
that is the prefix pass, W - 1 draft steps, K inner steps, and K more in backward, so at 48B, W = 64 and K = 4
about 72 gathers of the whole base. Also not built: loading the checkpoint sharded. Every process reads the whole
base into host memory first.
"""

from __future__ import annotations

import os

import torch

from rkl.config import RecursiveConfig
from rkl.errors import UserError


def fsdp_requested() -> bool:
    """Whether this process was launched with an FSDP accelerate config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def refuse_fsdp_where_the_base_trains(phase: str, config: RecursiveConfig) -> None:
    """Before anything loads: FSDP shards a base that does not train, which is phase A without LoRA or unfrozen
    layers (LoRA inherited from the starting checkpoint is caught by shard_decoder_layers, which sees the model)."""
    if not fsdp_requested():
        return
    if phase != "a":
        trains = f"phase {phase} trains weights inside the base"
    else:
        inside = [f"{name}={getattr(config, name)}" for name in ("lora_rank", "unfreeze_every")
                  if getattr(config, name) > 0]
        if not inside:
            return
        trains = f"this phase a trains weights inside it ({', '.join(inside)})"
    raise UserError(f"FSDP (configs/accelerate/fsdp2.yaml) shards a base that does not train, and {trains}; rkl does "
                    "not shard trained weights yet: launch it with configs/accelerate/ddp.yaml")


def shard_decoder_layers(base: torch.nn.Module, world: int, device: torch.device) -> dict[str, int]:
    """fully_shard every decoder layer of `base` (still on the CPU) over the `world` processes: fully_shard moves each
    layer to `device` as it shards it, so no process ever holds the whole base there. Returns what run.json records:
    the layers sharded and the base parameters this process holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any("lora_" in n for n, _ in base.named_parameters()):
        raise UserError("FSDP (configs/accelerate/fsdp2.yaml) shards a base that does not train, and this phase a "
                        "trains the LoRA adapters of the checkpoint it starts from; rkl does not shard trained weights "
                        "yet: launch it with configs/accelerate/ddp.yaml")
    base.requires_grad_(False)  # nothing in the base learns, so FSDP reduces no gradient of it
    layers = base.model.layers
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in base.parameters())
    return {"sharded_layers": len(layers), "base_parameters_here": int(local),
            "base_parameters": int(sum(p.numel() for p in base.parameters()))}
