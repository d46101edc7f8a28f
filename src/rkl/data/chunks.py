"""Refinement training data: (prefix, true chunk) pairs, how each training chunk is made, corruption masks,
schedules.

The refinement phases train the sidecar to repair what inference gives it: a draft. A training example is a
prefix of P tokens and the W tokens after it; `chunk_modes` says which chunk positions hold the true token and
which a model output (a greedy draft, a splice, model-sampled corruption). Only model-output positions are loss
positions (the leakage rule in DESIGN.md: a target visible in the chunk must not be a loss target). Everything
here is a pure function of its seed and step, like the LM batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rkl.data.packing import step_generator, windows
from rkl.errors import UserError


@dataclass
class ChunkBatch:
    prefix_ids: torch.Tensor  # [B, P] long: the committed context
    chunk_ids: torch.Tensor  # [B, W] long: the true chunk tokens (the targets)
    chunk_valid: torch.Tensor  # [B, W] bool: True up to and including the first EOS, False after it


def valid_until_eos(chunk_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True at positions with no EOS strictly before them: a chunk never runs into the next document."""
    is_eos = (chunk_ids == eos_id).long()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


def chunk_batch(stream: torch.Tensor, step: int, batch_size: int, chunk_width: int, min_prefix: int,
                max_prefix: int, seed: int, eos_id: int, prefix_len: int | None = None) -> ChunkBatch:
    """A batch of (prefix, chunk) pairs; a pure function of (seed, step).

    One prefix length P per batch, uniform in [min_prefix, max_prefix], so P varies across batches while
    a batch needs no padding. The prefix is the P stream tokens right before the chunk (it may cross a
    document boundary, as in packed pre-training). prefix_len: use this P instead of the drawn one (batches that
    are drafted together need one P); the chunks are where they would be with the drawn P.
    """
    if not 1 <= min_prefix <= max_prefix:
        # The prediction for chunk position 0 comes from the last prefix position: P >= 1.
        raise ValueError(f"need 1 <= min_prefix <= max_prefix, got {min_prefix}, {max_prefix}")
    if chunk_width < 1:
        raise ValueError(f"chunk_width must be >= 1, got {chunk_width}")
    n = stream.numel()
    if stream.ndim != 1 or n < max_prefix + chunk_width:
        raise UserError(f"the token stream has {n} tokens, fewer than max_prefix + chunk_width = "
                        f"{max_prefix + chunk_width}: use more data or shorter prefixes/chunks")
    g = step_generator(seed, step, "chunk")
    p = int(torch.randint(min_prefix, max_prefix + 1, (1,), generator=g))
    starts = torch.randint(p, n - chunk_width + 1, (batch_size,), generator=g)
    if prefix_len is not None:
        if not min_prefix <= prefix_len <= max_prefix:
            raise ValueError(f"prefix_len {prefix_len} is outside [{min_prefix}, {max_prefix}]")
        # a chunk whose start leaves fewer than prefix_len tokens before it moves right by what is missing
        starts, p = starts.clamp(min=prefix_len), prefix_len
    chunk = windows(stream, starts, chunk_width)
    return ChunkBatch(prefix_ids=windows(stream, starts - p, p), chunk_ids=chunk,
                      chunk_valid=valid_until_eos(chunk, eos_id))


def corruption_mask(valid: torch.Tensor, rate: float, kind: str, generator: torch.Generator) -> torch.Tensor:
    """[B, W] bool: which valid chunk positions to corrupt. Never marks an invalid position.

    "random": each valid position independently with probability `rate`, at least one per row that has a
    valid position (a row without a corrupted position has no loss position). "span": one contiguous run
    of round(rate * n_valid) valid positions (at least 1), placed uniformly. rate 0 marks nothing.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"corruption rate must be in [0, 1], got {rate}")
    if kind not in ("random", "span"):
        raise ValueError(f"corruption mask kind must be 'random' or 'span', got {kind!r}")
    valid = valid.bool()
    if rate == 0.0:
        return torch.zeros_like(valid)
    B, W = valid.shape
    u = torch.rand(B, W, generator=generator, device=generator.device).to(valid.device)
    has_valid = valid.any(dim=1, keepdim=True)
    if kind == "random":
        mask = (u < rate) & valid
        # Rows left empty get one position: the valid one with the smallest draw, uniform among valid ones.
        pick = torch.zeros_like(valid).scatter_(1, u.masked_fill(~valid, 2.0).argmin(dim=1, keepdim=True), True)
        return mask | (pick & ~mask.any(dim=1, keepdim=True) & has_valid)
    n_valid = valid.sum(dim=1, keepdim=True)
    length = torch.round(rate * n_valid.double()).long().clamp(min=1).minimum(n_valid)
    v = torch.rand(B, 1, generator=generator, device=generator.device).to(valid.device)
    start = (v * (n_valid - length + 1).double()).floor().long()
    rank = valid.long().cumsum(dim=1) - 1  # index of each valid position among the valid ones
    return valid & (rank >= start) & (rank < start + length) & has_valid


# What the chunk holds at each position (build_chunk in rkl.model.drafts fills it in, token by token):
TRUE, GREEDY, SAMPLE = 0, 1, 2
KINDS = ("draft", "splice", "sample")


def chunk_modes(batch_size: int, width: int, draft_share: float, splice_share: float, rate: float, mask_kind: str,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(modes [B, W] long, kind [B] long: an index into KINDS): how each row's training chunk is made.

    Each row is, independently, a DRAFT (prob. draft_share: the model's greedy continuation of the prefix at every
    position), else a SPLICE (prob. splice_share: the true chunk up to a position s uniform in 1..W-1, the model's
    greedy continuation after it) or SAMPLED corruption (`corruption_mask` positions hold a token sampled from the
    model's distribution given the chunk so far, the rest the true token).

    The modes never look at the chunk: not even at where its EOS is. Loss positions are the non-TRUE positions up to
    the chunk's EOS, so if the modes depended on the EOS, what fills the chunk after a loss position would tell
    whether that position's target is an EOS (a leak the non-causal refine cells could read).
    """
    u = torch.rand(batch_size, 2, generator=generator, device=generator.device).cpu()
    kind = torch.where(u[:, 0] < draft_share, 0, torch.where(u[:, 1] < splice_share, 1, 2))
    s = torch.rand(batch_size, generator=generator, device=generator.device).cpu()
    cut = 1 + (s * max(width - 1, 0)).floor().long()  # 1..W-1 (1 when W == 1)
    pos = torch.arange(width).unsqueeze(0)
    everywhere = torch.ones(batch_size, width, dtype=torch.bool)
    sampled = corruption_mask(everywhere, rate, mask_kind, generator).cpu()
    greedy = (kind == 0).unsqueeze(1) | ((kind == 1).unsqueeze(1) & (pos >= cut.unsqueeze(1)))
    modes = torch.where(greedy, GREEDY, torch.where(sampled & (kind == 2).unsqueeze(1), SAMPLE, TRUE))
    return modes, kind


def scheduled_value(start: float, final: float, schedule: str, step: int, total_steps: int) -> float:
    """A value moving from `start` (step 0) to `final` (step total_steps - 1): none, linear or cosine."""
    if schedule == "none":
        return start
    frac = min(1.0, max(0.0, step / max(1, total_steps - 1)))
    if schedule == "linear":
        w = frac
    elif schedule == "cosine":
        w = (1.0 - math.cos(math.pi * frac)) / 2.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use none, linear or cosine")
    # start + (final - start) * w, written so that w = 0 and w = 1 hit the endpoints exactly.
    return start * (1.0 - w) + final * w
