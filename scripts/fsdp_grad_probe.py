"""Run `rkl train` for one step with SGD at lr 1 instead of AdamW, so the checkpoint holds initial weights minus the
first step's gradient: two runs' weights then differ by exactly the difference of their gradients, which AdamW's
first step (about lr x sign(gradient) per element) would hide behind a sign. A diagnostic of the FSDP-on-GPU
mismatch (docs/benchmarks.md), not a training recipe.

    python3 scripts/fsdp_grad_probe.py train --phase c --model SURGERY --steps 1 --set warmup_steps=0 \
        --set grad_clip=0 ... --out A
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 scripts/fsdp_grad_probe.py \
        train ... --out B
    python3 scripts/fsdp_grad_probe.py --compare SURGERY A B DTYPE   (DTYPE: the runs' --dtype)

PROBE_AUTOCAST=0 runs without bf16 autocast (with --dtype float32 and TF32 off: float32 throughout); PROBE_AUTOCAST=cpu
with bf16 autocast on the CPU, as rkl trains on a GPU (PROBE_CACHE=1: with autocast's weight-cast cache, which lost
the sharded weights' gradients).
"""

from __future__ import annotations

import os
import sys

import torch


def sgd(groups, config):
    """One group per trained set, lr 1 (the scheduler's factor is 1 at step 0 with warmup_steps=0), no decay."""
    param_groups = [{"params": [p for p in params if p.requires_grad], "lr": 1.0, "name": name, "weight_decay": 0.0}
                    for name, (params, _) in groups.items()]
    return torch.optim.SGD([g for g in param_groups if g["params"]], lr=1.0)


def train_with_sgd() -> None:
    import accelerate

    import rkl.train.loop
    import rkl.train.refine_phases
    from rkl.cli import main

    rkl.train.loop.build_optimizer = sgd
    if os.environ.get("PROBE_AUTOCAST") == "cpu":  # bf16 autocast on the CPU, as rkl trains on a GPU
        # rkl's autocast settings (rkl.train.loop.AUTOCAST), or with the weight-cast cache on (PROBE_CACHE=1)
        handlers = [accelerate.utils.AutocastKwargs(cache_enabled=True) if os.environ.get("PROBE_CACHE") == "1"
                    else rkl.train.loop.AUTOCAST]
        rkl.train.refine_phases.make_accelerator = lambda config: accelerate.Accelerator(
            cpu=True, mixed_precision="bf16", kwargs_handlers=handlers)
    if os.environ.get("PROBE_AUTOCAST", "1") == "0":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        rkl.train.refine_phases.make_accelerator = lambda config: accelerate.Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision="no")
    main()


def compare(surgery: str, a: str, b: str, dtype: str) -> None:
    """Per trained set: |g_a - g_b| against |g_a|, with g = initial - final weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    from rkl.model.base import load_base
    from rkl.model.surgery import find_base

    init = {"sidecar": load_file(f"{surgery}/sidecar.safetensors")}
    base, _ = load_base(find_base(Path(surgery))["base"].removeprefix("preset:"), dtype=dtype, seed=0)  # as phase C
    weights = {n: p.detach().float().cpu() for n, p in base.named_parameters()}
    init["unfrozen"] = {k: weights[k.replace(".base_layer", "")] for k in load_file(f"{a}/unfrozen.safetensors")}
    init["lora"] = None  # fresh adapters: B starts at 0 (its gradient is all of it), A gets no gradient at step 1
    for name in ("sidecar", "lora", "unfrozen"):
        wa, wb = (load_file(f"{run}/{name}.safetensors") for run in (a, b))
        start = init[name]
        ga = {k: (start[k].float() - wa[k].float()) if start is not None
              else (-wa[k].float() if "lora_B" in k else torch.zeros_like(wa[k].float())) for k in wa}
        diff = {k: (wa[k].float() - wb[k].float()) for k in wa}  # = g_b - g_a
        norm = lambda d: float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))  # noqa: E731
        worst = max(wa, key=lambda k: float(diff[k].norm() / ga[k].norm().clamp(min=1e-30)))
        largest = max(float(v.abs().max()) for v in diff.values())
        print(f"{name:9s} {len(wa):3d} tensors  |g| = {norm(ga):.4e}  |g_a - g_b| = {norm(diff):.4e}  "
              f"relative {norm(diff) / max(norm(ga), 1e-30):.3e}  max elementwise {largest:.3e}"
              f"  worst tensor {worst} ({float(diff[worst].norm() / ga[worst].norm().clamp(min=1e-30)):.3e})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        compare(*sys.argv[2:6])
    else:
        train_with_sgd()
