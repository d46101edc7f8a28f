"""What phases B and C change inside the base: LoRA adapters (peft) and unfrozen layers.

Both are saved beside the sidecar as small safetensors files, never as a second copy of the base:
`lora.safetensors` (peft's adapter state) and `unfrozen.safetensors` (full weights of the unfrozen layers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from rkl.config import RecursiveConfig
from rkl.errors import UserError
from rkl.model import expert_lora
from rkl.model.weights import read_safetensors, safetensors_keys

LORA_FILE = "lora.safetensors"
UNFROZEN_FILE = "unfrozen.safetensors"
LORA_SHAPE_FILE = "lora_config.json"  # rank, alpha, layers the adapters were built with
# Attention (KDA and MLA) and MLP projections: plain Linear layers (the dense MLPs and the shared expert too).
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                    "gate_proj", "up_proj", "down_proj")
# The routed experts of a transformers-5 Kimi-Linear are fused 3-D parameters ([experts, out, in]) that
# `target_modules` cannot reach; peft adapts them through `target_parameters` (one LoRA pair per parameter, its
# rank spread over the experts).
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def lora_layers(num_layers: int, which: str) -> list[int]:
    """'top_third': the last ceil(n/3) decoder layers; 'all': every layer."""
    if which == "all":
        return list(range(num_layers))
    return list(range(num_layers - math.ceil(num_layers / 3), num_layers))


def lora_target_regex(layers: list[int]) -> str:
    layer_alt = "|".join(map(str, layers))
    proj_alt = "|".join(LORA_PROJECTIONS)
    return rf"model\.layers\.({layer_alt})\.(self_attn|mlp|mlp\.shared_experts)\.({proj_alt})"


def apply_lora(base: torch.nn.Module, config: RecursiveConfig) -> list[torch.nn.Parameter]:
    """Inject LoRA adapters in place (module objects and forward hooks stay valid); return their parameters."""
    if not any("lora_" in n for n, _ in base.named_parameters()):  # else: resumed, or phase B's adapters
        inject_lora(base, {"rank": config.lora_rank, "alpha": config.lora_alpha, "layers": config.lora_layers,
                           "experts": config.lora_experts})
    params = [p for n, p in base.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def expert_parameter_names(base: torch.nn.Module, layers: list[int]) -> list[str]:
    """The fused routed-expert parameters of `layers` (layers with a dense MLP have none)."""
    names = {n for n, _ in base.named_parameters()}
    return [f"model.layers.{i}.mlp.experts.{p}" for i in layers for p in EXPERT_PARAMETERS
            if f"model.layers.{i}.mlp.experts.{p}" in names]


def inject_lora(base: torch.nn.Module, shape: dict) -> None:
    """Inject adapters of `shape` ({"rank", "alpha", "layers", "experts"}) in float32 and remember the shape.

    "experts": also adapt the routed experts (checkpoints written before they were adapted lack the key and load
    without them).

    float32 whatever the base's dtype: they train, and bf16 weights lose AdamW's small steps to rounding. peft
    casts a LoRA layer's input to the adapter's dtype and the result back, so they run inside a bf16 base.

    The routed experts' adapters run through `expert_lora` (side products instead of peft's merged stacks)."""
    layers = lora_layers(base.config.num_hidden_layers, shape["layers"])
    experts = expert_parameter_names(base, layers) if shape.get("experts", False) else None
    inject_adapter_in_model(LoraConfig(r=shape["rank"], lora_alpha=shape["alpha"], lora_dropout=0.0,
                                       target_modules=lora_target_regex(layers), target_parameters=experts), base)
    for name, p in base.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    for name in experts or []:
        if name.endswith(".down_proj"):  # the outer wrapper: down_proj's around gate_up_proj's
            expert_lora.install(base.get_submodule(name.removesuffix(".down_proj")))
    base.rkl_lora_shape = dict(shape)


def unfrozen_layers(num_layers: int, every: int) -> list[int]:
    """Every `every`-th decoder layer, counting from 1: layers every-1, 2*every-1, ..."""
    return [i for i in range(num_layers) if every and (i + 1) % every == 0]


def _cast_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    module.rkl_io_dtype = (args[0] if args else kwargs["hidden_states"]).dtype
    if args:
        return (args[0].float(), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].float()}


def _cast_output(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    if isinstance(output, tuple):
        return (output[0].to(module.rkl_io_dtype), *output[1:])
    return output.to(module.rkl_io_dtype)


def keep_layers_float32(base: torch.nn.Module, layers: list[int]) -> None:
    """Cast decoder layers to float32 inside a lower-precision base: the layer computes in float32 and hands its
    output back in the base's dtype (hooks). Unfrozen layers train like this, so AdamW's steps are not rounded
    away, and a reload of their saved float32 weights computes exactly what was trained. No-op in a float32 base."""
    for i in layers:
        layer = base.model.layers[i]
        if getattr(layer, "rkl_float32", False) or all(p.dtype == torch.float32 for p in layer.parameters()):
            continue
        layer.float()
        layer.register_forward_pre_hook(_cast_input, with_kwargs=True, prepend=True)
        layer.register_forward_hook(_cast_output, with_kwargs=True)
        layer.rkl_float32 = True


def unfreeze(base: torch.nn.Module, config: RecursiveConfig) -> dict[str, torch.nn.Parameter]:
    """Make every `unfreeze_every`-th layer trainable (LoRA params excluded), in float32; return them by name."""
    chosen = unfrozen_layers(base.config.num_hidden_layers, config.unfreeze_every)
    keep_layers_float32(base, chosen)
    params = {}
    for i in chosen:
        for name, p in base.model.layers[i].named_parameters():
            if "lora_" not in name:
                p.requires_grad_(True)
                params[f"model.layers.{i}.{name}"] = p
    return params


L2_CHUNK = 1 << 24  # elements per float32 temporary of the L2 pull's forward (64 MiB)


class _SquaredDistance(torch.autograd.Function):
    """||p - r||^2 of one tensor, with gradient 2 (p - r) * g, saving only p and r themselves for backward.

    Autograd's own (p.float() - r.float()).pow(2).sum() keeps the float32 difference of every unfrozen tensor until
    backward: one more float32 copy of all the unfrozen layers (13.8 GiB for 2 MoE layers at the 48B widths, by
    scripts/bench_l2_pull.py), taken at the end of the forward, where activations peak; phase C at the 48B widths ran
    out of memory there on one H200. Here the forward sums in chunks, and backward builds the difference once, as the
    gradient itself.
    One chunk (the tensors of the small presets) computes what autograd's form computes; the gradient is the same
    (times 2 is exact)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p, r)
        p_flat, r_flat = p.reshape(-1), r.reshape(-1)
        total = None
        for start in range(0, p_flat.numel(), L2_CHUNK):
            d = p_flat[start:start + L2_CHUNK].float() - r_flat[start:start + L2_CHUNK].float()
            part = d.pow(2).sum()
            total = part if total is None else total + part
        return total if total is not None else torch.zeros((), device=p.device)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, r = ctx.saved_tensors
        return (p.float() - r).mul_(2 * g).to(p.dtype), None  # float32 p: no copy made but the gradient


def l2_to_pretrained(params: dict[str, torch.nn.Parameter], reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum ||theta - theta_0||^2 over the unfrozen parameters (EWC-lite with a unit Fisher). With FSDP, parameter and
    reference are sharded alike: each process sums its own shards, and that sum is summed over the processes (a
    Partial DTensor made whole: one all-reduce per mesh and placement, not one per tensor), so the gradient reaches
    every shard."""
    total, sharded = None, {}
    for name, p in params.items():
        r = reference[name]
        if isinstance(p, DTensor):
            local = _SquaredDistance.apply(p.to_local(), r.to_local())
            key = (p.device_mesh, tuple(p.placements))
            sharded[key] = local if key not in sharded else sharded[key] + local
        else:
            term = _SquaredDistance.apply(p, r)
            total = term if total is None else total + term
    for (mesh, placements), local in sharded.items():
        # summed over the mesh dimensions that shard p, equal on those that replicate it
        partial = [Partial() if isinstance(x, Shard) else Replicate() for x in placements]
        term = DTensor.from_local(local, mesh, partial).full_tensor()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def save_base_changes(base: torch.nn.Module, config: RecursiveConfig, out_dir: Path,
                      unfrozen_written: bool = False) -> None:
    """unfrozen_written: UNFROZEN_FILE is in out_dir already (FSDP, where the base holds only shards of the unfrozen
    layers: rkl.train.refine_phases.RefineTask.save_sharded streams it)."""
    if any("lora_" in n for n, _ in base.named_parameters()):  # also adapters inherited from phase B
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(base).items()}
        save_file(state, str(Path(out_dir) / LORA_FILE))
        (Path(out_dir) / LORA_SHAPE_FILE).write_text(json.dumps(base.rkl_lora_shape) + "\n")
    if config.unfreeze_every > 0 and not unfrozen_written:
        chosen = unfrozen_layers(base.config.num_hidden_layers, config.unfreeze_every)
        state = {f"model.layers.{i}.{n}": p.detach()
                 for i in chosen for n, p in base.model.layers[i].named_parameters() if "lora_" not in n}
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out_dir) / UNFROZEN_FILE))


def load_base_changes(base: torch.nn.Module, config: RecursiveConfig, folder: Path) -> None:
    """Re-apply what a phase-B/C checkpoint changed in the base (no-op for other checkpoints). On a meta-device base
    (a skeleton that rkl.train.sharding fills by broadcast) only the structure: adapters injected, unfrozen layers
    float32, no value read."""
    folder = Path(folder)
    skeleton = next(base.parameters()).is_meta
    # LoRA first: an unfrozen layer of phase C was saved with LoRA injected (names like q_proj.base_layer.weight).
    if (folder / LORA_FILE).is_file():
        # The adapters' shape comes from the file saved with them, not from the current config: phase C may
        # run with another lora_rank than the phase B that trained them.
        shape = json.loads((folder / LORA_SHAPE_FILE).read_text())
        if not any("lora_" in n for n, _ in base.named_parameters()):
            inject_lora(base, shape)
        if not skeleton:
            device = next(base.parameters()).device
            try:
                set_peft_model_state_dict(base, read_safetensors(folder / LORA_FILE, device=str(device)))
            except RuntimeError as e:
                raise UserError(f"LoRA weights in {folder} do not fit this base ({str(e).splitlines()[0]})") from None
    if (folder / UNFROZEN_FILE).is_file():
        if skeleton:
            names = safetensors_keys(folder / UNFROZEN_FILE)
            keep_layers_float32(base, sorted({int(k.split(".")[2]) for k in names if k.startswith("model.layers.")}))
            return
        state = read_safetensors(folder / UNFROZEN_FILE)
        keep_layers_float32(base, sorted({int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}))
        try:
            result = base.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise UserError(f"{folder / UNFROZEN_FILE} does not fit this base ({str(e).splitlines()[0]})") from None
        if result.unexpected_keys:
            raise UserError(f"{folder / UNFROZEN_FILE} does not fit this base: {result.unexpected_keys[:3]}")
