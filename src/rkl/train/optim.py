"""AdamW over named parameter groups, with linear warmup then cosine decay to a floor, per group."""

from __future__ import annotations

import math

import torch

from rkl.config import RecursiveConfig


NO_DECAY_GROUPS = ("unfrozen",)


def build_optimizer(groups: dict[str, tuple[list[torch.nn.Parameter], float]], config: RecursiveConfig
                    ) -> torch.optim.AdamW:
    """groups: name -> (parameters, peak lr). Names are kept on the groups so logs can say which lr is which.

    Biases, norms and 1-D parameters get no weight decay (the usual GPT recipe), and neither do the groups in
    NO_DECAY_GROUPS: unfrozen base weights are pulled toward their PRETRAINED values by phase C's L2 term, and
    decay toward 0 would fight it."""
    param_groups = []
    for name, (params, lr) in groups.items():
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        decay = [p for p in params if p.ndim >= 2 and name not in NO_DECAY_GROUPS]
        no_decay = [p for p in params if p.ndim < 2 or name in NO_DECAY_GROUPS]
        if decay:
            param_groups.append({"params": decay, "lr": lr, "name": name, "weight_decay": config.weight_decay})
        if no_decay:
            param_groups.append({"params": no_decay, "lr": lr, "name": f"{name}_nodecay", "weight_decay": 0.0})
    if not param_groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, config: RecursiveConfig) -> float:
    """Multiplier of each group's peak lr at `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    warmup = min(config.warmup_steps, max(config.steps - 1, 0))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, config.steps - warmup - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, config: RecursiveConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
