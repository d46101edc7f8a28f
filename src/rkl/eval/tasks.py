"""Shared pieces of the metric groups of `rkl eval` (example-set sizes, seeds, Group, clustered standard
errors) and the first group, teacher-forced perplexity. Refinement metrics: rkl.eval.refinement; arithmetic
and generation: rkl.eval.generation.

Every example set is a pure function of the held-out token stream and fixed seeds, identical for every stage,
so two stages' numbers differ only because their models differ. Where the sidecar runs, it never reads a token
it is scored on: restoration scores only corrupted positions (their true token is not in the chunk it reads),
draft quality scores the refined model's draft against a continuation it never sees, perplexity is teacher
forced through the base alone (the sidecar acts only inside refinement passes).

Standard errors go into `Group.stderr` clustered by the unit that is independent (a window, a chunk, a problem):
positions inside one chunk are correlated, so a binomial SE over positions would be too small.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rkl.data.packing import windows
from rkl.errors import UserError
from rkl.eval.metrics import NLLAccumulator

EVAL_SEED = 20_261_103      # seeds every held-out example set (chunk positions, corruption)
PPL_LEN, PPL_BATCH = 128, 8  # perplexity windows: 128 scored tokens each
CHUNK_BATCH = 16
PREFIX_RANGE = (16, 48)     # prefix length P per chunk batch, uniform in this range (fixed for every stage)
RESTORE_MASK = "random"     # corruption positions: independent per position
RESTORE_RATE = 0.3          # fixed for every stage, so restoration is scored on the same corrupted chunks
GEN_BATCH = 25
# How many examples each group scores. On CPU the pure-PyTorch KDA fallback pads every chunk forward to 64
# positions, so each refine pass of one row costs ~30-50 ms on the tiny model whatever W is: these sizes keep one
# `rkl eval` of the tiny preset under a minute on 2 cores. On a GPU the sets are larger. Both are recorded in
# the result (data.eval_set and counts); compare warns when two stages were scored on different counts.
SIZES = {
    "cpu": {"windows": 16, "chunks": 32, "arith": 100, "tpot": 50, "cont": 50},
    "cuda": {"windows": 64, "chunks": 256, "arith": 500, "tpot": 100, "cont": 100},
}

Tick = Callable[[int], None]


@dataclass
class Group:
    """One metric group's output: metrics, counts (independent items), clustered standard errors, extras."""

    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def cluster_se(hits: Sequence[float], sizes: Sequence[float]) -> float:
    """SE of the ratio sum(hits)/sum(sizes) over independent clusters (linearisation, n/(n-1) correction)."""
    pairs = [(h, n) for h, n in zip(hits, sizes) if n > 0]
    if len(pairs) < 2:
        return math.nan
    total = sum(n for _, n in pairs)
    p = sum(h for h, _ in pairs) / total
    var = sum((h - p * n) ** 2 for h, n in pairs) * len(pairs) / (len(pairs) - 1)
    return math.sqrt(var) / total


def row_stats(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
              ) -> tuple[list[float], list[float], list[float]]:
    """Per row: (sum of NLL, #correct, #scored) at mask positions, for clustered standard errors."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    right = (logits.argmax(-1) == labels) & mask
    m = mask.float()
    return (nll * m).double().sum(1).tolist(), right.double().sum(1).tolist(), m.double().sum(1).tolist()


def eval_sizes(device_type: str, limit: int | None = None) -> dict[str, int]:
    """Examples per group for a device type ("cuda" or anything else = "cpu"), each capped at `limit`."""
    sizes = dict(SIZES["cuda" if device_type == "cuda" else "cpu"])
    return {k: v if limit is None else max(1, min(v, limit)) for k, v in sizes.items()}


def model_device(wrapper) -> torch.device:
    return wrapper.base.get_input_embeddings().weight.device


# ------------------------------------------------------------------------------------------- perplexity
def window_starts(n_tokens: int, count: int, length: int) -> list[int]:
    """`count` evenly spaced window starts over the stream (first at 0, last at the end): every part of the
    held-out mix (code, plays, arithmetic) is represented, and no RNG is involved."""
    last = n_tokens - (length + 1)
    if last < 0:
        raise UserError(f"the held-out stream has {n_tokens} tokens, fewer than one window of {length + 1}: "
                        "use a larger data source (--set data=... / max_chars_per_source=...)")
    return [round(i * last / (count - 1)) if count > 1 else 0 for i in range(count)]


def perplexity(wrapper, stream: torch.Tensor, count: int, tick: Tick) -> Group:
    """perplexity = exp(sum NLL / N) and token_accuracy = #argmax right / N over every position of every window
    (teacher forced; the first token of each window is context only); pooled, not averaged per window."""
    dev, acc = model_device(wrapper), NLLAccumulator()
    starts = torch.tensor(window_starts(stream.numel(), count, PPL_LEN))
    nll_rows, hit_rows, n_rows = [], [], []
    for i in range(0, len(starts), PPL_BATCH):
        w = windows(stream, starts[i:i + PPL_BATCH], PPL_LEN + 1).to(dev)
        logits = wrapper.base(input_ids=w[:, :-1], use_cache=False).logits
        labels = w[:, 1:]
        acc.add(logits, labels)
        a, b, c = row_stats(logits, labels, torch.ones_like(labels, dtype=torch.bool))
        nll_rows += a; hit_rows += b; n_rows += c  # noqa: E702
        tick(w.shape[0])
    se_nll = cluster_se(nll_rows, n_rows)
    g = Group({"perplexity": acc.perplexity(), "mean_nll": acc.mean_nll(), "token_accuracy": acc.token_accuracy()},
              {"tokens": acc.tokens, "windows": len(starts)},
              {"perplexity": acc.perplexity() * se_nll, "mean_nll": se_nll,
               "token_accuracy": cluster_se(hit_rows, n_rows)})
    return g
