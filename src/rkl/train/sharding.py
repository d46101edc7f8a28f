"""FSDP2 for the recursive phases: each process keeps 1/N of every decoder layer, all-gathered only while it runs.

`accelerate launch --config_file configs/accelerate/fsdp2.yaml -m rkl train --phase a|b|c` asks for it: accelerate
exports ACCELERATE_USE_FSDP from the file, also from a copy with `use_cpu: true`, as the tests launch it. (The `--cpu`
flag starts a single process without it.) rkl does the sharding itself with torch's `fully_shard`, one unit per
decoder layer, instead of `accelerator.prepare`. The phases call their models' own methods (prefix pass, draft walk,
K inner steps through hooks), not one module's forward, so no single wrapper could see them. The sharding is what
saves memory at 48B (98 GB of bf16 weights, a quarter per GPU on 4). The embeddings, the final norm and the LM head
stay whole on every process, because rkl calls them directly.

What trains, and where its gradients and optimizer state live:
- the sidecar (outside the base) and the LoRA adapters (inside sharded layers, but left out of the sharding: they
  are small, and float32 inside a bf16 layer, where one FSDP unit needs one dtype) are replicated; the training loop
  all-reduces their gradients as in data parallel;
- phase C's unfrozen layers (every unfreeze_every-th layer, float32, 11.09B parameters at 48B) are sharded:
  FSDP reduce-scatters their gradients, and AdamW keeps 1/N of their state on each process. A checkpoint gathers
  them one tensor at a time to the main process and saves what a single-process run saves (each weight streamed
  into unfrozen.safetensors as it comes, the optimizer state's tensors a part file at a time:
  rkl.train.checkpoint.StateParts), so a run resumes
  exactly, `rkl eval` loads it as any other, and it loads under another launcher or process count (which then trains
  on another global batch, batch_size x processes). An interrupt (Ctrl-C) writes no checkpoint here: the processes
  may stop at different points, so the gathers could pair up wrongly; the last periodic checkpoint stands.
Pretrain and vanilla train all of the base and are refused.

Every process must run each layer the same number of times, because each run all-gathers it. The training paths
keep to that: the draft walk is W - 1 decode steps on every process, training runs all K inner steps, validation
runs the same batches everywhere, and the drift probe's generations are synced.

What it costs, not yet measured on GPUs: each use of a layer all-gathers it, with no prefetch. In one phase-A step
that is the prefix pass, W - 1 draft steps, K inner steps, and K more in backward, so at 48B, W = 64 and K = 4
about 72 gathers of the whole base.

Loading: only the first process reads the checkpoint (in phase C also the pretrained copy that the L2 pull and the
drift compare with, sharded the same way and dropped once its reference tensors and generations are taken). The
others build the model on the meta device, shard it, and receive their shards (fill_from_first), so a host holds one
whole base, read once. Data parallel fills every process with the whole model the same way.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from rkl.errors import UserError


TESTED_TORCH = (2, 11)  # the GPU machines' torch; the CPU tests run 2.13


def fsdp_requested() -> bool:
    """Whether this process was launched with an FSDP accelerate config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def refuse_fsdp_for_full_fine_tunes(phase: str) -> None:
    """Before anything loads: pretrain and vanilla train every weight of the base, which rkl does not shard."""
    if fsdp_requested() and phase in ("pretrain", "vanilla"):
        raise UserError(f"FSDP (configs/accelerate/fsdp2.yaml) is built for the recursive phases a, b and c, and phase "
                        f"{phase} trains all of the base: launch it with configs/accelerate/ddp.yaml")


def device_mesh(world: int, device: torch.device):
    """The 1-D mesh over all processes that every layer is sharded on. Collective (it may create a process group):
    every process calls it, before loading."""
    from torch.distributed.device_mesh import init_device_mesh

    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < TESTED_TORCH:
        raise UserError(f"rkl's FSDP is tested with torch >= {'.'.join(map(str, TESTED_TORCH))} (fully_shard's "
                        f"ignored_params, distribute_tensor's src_data_rank); this is torch {torch.__version__}: "
                        "upgrade torch or launch with configs/accelerate/ddp.yaml")
    return init_device_mesh(device.type, (world,))


def shard_decoder_layers(base: torch.nn.Module, mesh) -> dict[str, int]:
    """fully_shard every decoder layer of `base` (still on the CPU) over `mesh`: fully_shard moves each layer to the
    mesh's device as it shards it, so no process ever holds the whole base there. Local to this process (no
    communication), so processes may shard in turn. LoRA parameters stay whole (see the module docstring); set what
    trains (LoRA, unfrozen layers) before this. Returns what run.json records: the layers sharded and the base
    parameters this process holds."""
    from torch.distributed.fsdp import fully_shard

    layers = base.model.layers
    for layer in layers:
        adapters = {p for n, p in layer.named_parameters() if "lora_" in n}
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, ignored_params=adapters or None)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in base.parameters())
    return {"sharded_layers": len(layers), "base_parameters_here": int(local),
            "base_parameters": int(sum(p.numel() for p in base.parameters()))}


# How long the other processes may wait while the first reads the checkpoint (rkl.train.refine_phases). At 48B that
# read is 98 GB, which can take longer than the process group's timeout (NCCL's default is 10 minutes, and it kills
# the job). They wait on a gloo group of their own with this timeout, so training's collectives keep the short
# default that catches a real hang.
LOAD_WAIT_TIMEOUT_S = 2 * 3600


def fill_from_first(model: torch.nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device,
                    barrier: Callable[[], None]) -> None:
    """Give every process `model`'s values from the first process, each keeping only its shards of the sharded
    layers. The first process passes `full`, its whole state dict taken before sharding (its tensors, wherever they
    are); every other process passes None and a meta-device skeleton of the same structure (the model was built
    without reading a weight). Collective: every process calls it, in the same order. barrier: where the other
    processes wait while the first reads the checkpoint (load_barrier(), made before loading).

    Names, shapes and dtypes are compared first, on every process (all raise together). Then one tensor at a time:
    a whole tensor is broadcast into the model's own storage, a sharded one scattered from the first process's
    whole copy, so a process holds at most one whole tensor beyond its model."""
    import torch.distributed as dist

    if full is None:
        model.to_empty(device=device)
    else:
        model.to(device)
    barrier()
    state = model.state_dict()  # the model's own storage (detached views), DTensors where sharded
    mine = {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}
    sent = [{k: (tuple(v.shape), str(v.dtype)) for k, v in full.items()} if full is not None else None]
    dist.broadcast_object_list(sent, src=0)
    differ = sorted(k for k in set(mine) | set(sent[0]) if mine.get(k) != sent[0].get(k))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, differ)
    if any(everyone):
        rank, keys = next((r, d) for r, d in enumerate(everyone) if d)
        raise RuntimeError(f"process {rank} built another model than the first process (shapes and dtypes differ): "
                           f"{keys[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if isinstance(tensor, DTensor):
                whole = (full[name].to(device) if full is not None
                         else torch.empty(tensor.shape, dtype=tensor.dtype, device=device))
                part = distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=0)
                tensor.to_local().copy_(part.to_local())
                del whole, part
            else:
                dist.broadcast(tensor, src=0)  # the first process's model holds what it read


def load_barrier() -> Callable[[], None]:
    """A barrier on a gloo group of all processes that waits LOAD_WAIT_TIMEOUT_S. Collective (new_group): every
    process calls it, before the first starts reading."""
    from datetime import timedelta

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=LOAD_WAIT_TIMEOUT_S))
    return lambda: dist.barrier(group=group)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


@torch.no_grad()
def full_tensor(tensor: torch.Tensor, main: bool) -> torch.Tensor | None:
    """The whole tensor on the CPU of the main process (None elsewhere). Collective for a sharded tensor: every
    process calls it, in the same order, and holds the whole tensor on its device until it returns."""
    whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return whole.detach().cpu() if main else None


def full_optimizer_state(optimizer: torch.optim.Optimizer, main: bool, parts=None) -> dict | None:
    """optimizer.state_dict() with every sharded state tensor gathered whole, on the main process (None elsewhere):
    the state a single-process run saves. Collective where a trained tensor is sharded. With `parts` (a
    rkl.train.checkpoint.StateParts, on the main process) each gathered tensor goes into its part files as it comes
    and the state holds where it went: the main process holds a part's worth, or one larger tensor, at a time."""
    state = optimizer.state_dict()
    gathered = {}
    for index, per_param in state["state"].items():  # copies: these dicts are the optimizer's live state
        gathered[index] = {}
        for k, v in per_param.items():
            if isinstance(v, DTensor):
                v = full_tensor(v, main)
                if parts is not None:
                    v = parts.store(f"{index}.{k}", v)
            gathered[index][k] = v
    if parts is not None:
        parts.flush()
    return {**state, "state": gathered} if main else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of full_optimizer_state for this process: each saved whole tensor of a sharded parameter cut to
    the parameter's own shard (every process read the whole state, so no communication)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in state["param_groups"] for i in group["params"]]
    per_param = dict(state["state"])
    for param, index in zip(params, indices):
        if not isinstance(param, DTensor) or index not in per_param:
            continue
        per_param[index] = {k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements,
                                                 src_data_rank=None)
                            if torch.is_tensor(v) and v.shape == param.shape else v
                            for k, v in per_param[index].items()}
    return {**state, "state": per_param}


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over parameters of which some may be sharded: the norm of the sharded gradients is reduced
    across processes and combined with that of the replicated ones. Without sharded ones it is clip_grad_norm_."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()]
    if replicated:
        norms.append(torch.nn.utils.get_total_norm(replicated).to(norms[0].device))
    total = torch.nn.utils.get_total_norm(norms)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.device))
    return total
