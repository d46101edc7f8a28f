"""FSDP2 for the frozen base: each process keeps 1/N of every decoder layer, all-gathered only while it runs.

`accelerate launch --config_file configs/accelerate/fsdp2.yaml -m rkl train --phase a` asks for it (accelerate
sets ACCELERATE_USE_FSDP and FSDP_VERSION from the config, on GPUs and with `--cpu` alike). rkl does the sharding
itself with torch's `fully_shard`, one unit per decoder layer, instead of `accelerator.prepare`. The phases call
their models' own methods (prefix pass, draft walk, K inner steps through hooks), not one module's forward, so no
single wrapper could see them. The sharding is what saves memory at 48B (98 GB of bf16 weights, a quarter per GPU on
4). The embeddings, the final norm and the LM head stay whole on every process, because rkl calls them directly.

Phase A only, where every trainable tensor lives outside the base (the sidecar): its gradients are all-reduced by the
training loop as in data parallel, and its optimizer state is the only one. Phases B and C train tensors inside the
sharded layers (LoRA, unfrozen layers), and pretrain and vanilla train all of the base; those are refused.

Every process must run each layer the same number of times, because each run all-gathers it. The training paths
keep to that: the draft walk is W - 1 decode steps on every process, training runs all K inner steps, and
validation runs the same batches everywhere.
"""

from __future__ import annotations

import os

import torch

from rkl.errors import UserError


def fsdp_requested() -> bool:
    """Whether this process was launched with an FSDP accelerate config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def refuse_fsdp_unless_phase_a(phase: str) -> None:
    if fsdp_requested() and phase != "a":
        raise UserError(f"FSDP (configs/accelerate/fsdp2.yaml) shards the frozen base of phase a; phase {phase} trains "
                        "weights inside the base, which rkl does not shard yet: launch it with "
                        "configs/accelerate/ddp.yaml")


def shard_decoder_layers(base: torch.nn.Module, world: int) -> dict[str, int]:
    """fully_shard every decoder layer of `base` over the `world` processes (already on their devices). Returns what
    run.json records: the layers sharded and the base parameters this process holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base.requires_grad_(False)  # phase A: nothing in the base learns, so FSDP reduces no gradient of it
    layers = base.model.layers
    device_type = next(base.parameters()).device.type
    mesh = init_device_mesh(device_type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in base.parameters())
    return {"sharded_layers": len(layers), "base_parameters_here": int(local),
            "base_parameters": int(sum(p.numel() for p in base.parameters()))}
