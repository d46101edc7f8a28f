"""The commit rule: how many tokens of a refined chunk a row keeps.

Per row: everything up to and including the first position whose token refinement changed (every later draft
token was decoded after the old token there, so it is stale), the whole chunk if nothing changed, and never past
the row's first position it may not commit (padding after an EOS, positions beyond the generation budget): an
edited EOS therefore never commits the padding that followed it.

The rule is label-free (it reads no target), leak-free, and exact at neutral init: an untrained sidecar changes no
token, so every chunk commits whole and generation equals the baseline's. Training uses the same function for the
halting target (rkl.train.losses.halt_targets), so the head learns about the commits inference makes.
"""

from __future__ import annotations

import torch


def _first(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row [B], or W where there is none."""
    w = flags.shape[1]
    return torch.where(flags.any(-1), flags.long().argmax(-1), torch.full_like(flags[:, 0], w, dtype=torch.long))


def commit_lengths(changed: torch.Tensor, committable: torch.Tensor) -> torch.Tensor:
    """[B] long: tokens to commit per row.

    changed [B, W] bool: positions whose token differed from the chunk as refinement received it at ANY inner step
    (`RefineResult.changed`): a token changed at step 2 and changed back at step 3 still had later steps read the
    other token, so what follows it is stale; committable [B, W] bool: positions the row may commit (a row's commit
    ends at its first False).
    """
    return torch.minimum(_first(changed & committable) + 1, _first(~committable))
