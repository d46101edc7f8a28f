"""BoundaryHead: decides when the inner loop may stop (the commit / halting head).

It reads one summary vector per row: the final (post-norm) hidden state of the last valid chunk position, or of
the latent [Z] position when `use_latent_token` is on, and gives a commit logit [B]: p_commit = sigmoid(logit).
Zero weight and bias -2 at init: p_commit = sigmoid(-2) = 0.12 for every input, so an untrained head never stops
the loop early (thresholds are >= min_commit_threshold, 0.5 by default) and every inner step runs. (The output
layer starts at zero weight, so the shared body gets its first gradient after the first optimizer step, the usual
zero-init of heads.)

How many tokens a chunk commits is not this head's business: the commit rule (wrapper.commit_lengths) keeps,
per row, everything up to and including the first token refinement changed. An earlier design predicted the
length with a classifier trained on the longest correct draft prefix; its target's mode is 1 for any realistic
draft accuracy, so it collapsed to committing one token per chunk.
"""

from __future__ import annotations

import torch
from torch import nn


class BoundaryHead(nn.Module):
    def __init__(self, hidden_size: int, gate_hidden: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.body = nn.Sequential(nn.Linear(hidden_size, gate_hidden), nn.GELU())
        self.commit = nn.Linear(gate_hidden, 1)
        self.reset_neutral()

    def reset_neutral(self) -> None:
        """Commit head: zero weight, bias -2 (p_commit 0.12 for every input)."""
        with torch.no_grad():
            self.commit.weight.zero_()
            nn.init.constant_(self.commit.bias, -2.0)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        """summary [B, H] -> commit_logit [B]."""
        x = self.body(self.norm(summary.to(self.commit.weight.dtype)))
        return self.commit(x).squeeze(-1)
