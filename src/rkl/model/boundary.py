"""BoundaryHead: decides when an inner loop may stop (commit) and how many chunk tokens to keep (length).

It reads one summary vector per row: the final (post-norm) hidden state of the last valid chunk position, or of
the latent [Z] position when `use_latent_token` is on. Outputs:

- commit logit [B]: p_commit = sigmoid(logit). Zero weights and bias -2 at init: p_commit = sigmoid(-2) = 0.12 for
  every input, so an untrained head never stops the loop early (thresholds are >= min_commit_threshold, 0.5 by
  default) and every inner step runs. (Both output layers start at zero weight, so the shared body gets its first
  gradient after the first optimizer step, the usual zero-init of heads.)
- length logits [B, max_chunk_len] over classes 1..max_chunk_len (class c means "commit c + 1 tokens").
  Neutral init: zero weights and a bias that is 0 everywhere except log(max_chunk_len - 1) at class
  chunk_width - 1. The logits are then the bias for any input, the argmax is class chunk_width - 1, i.e. "commit
  the full chunk", and that class holds probability 1/2 (the other half spread uniformly), a soft start for the
  length CE rather than a saturated one. With max_chunk_len == 1 the single class is the argmax anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BoundaryHead(nn.Module):
    def __init__(self, hidden_size: int, gate_hidden: int = 64, max_chunk_len: int = 64, chunk_width: int = 16) -> None:
        super().__init__()
        if not 1 <= chunk_width <= max_chunk_len:
            raise ValueError(f"chunk_width {chunk_width} must be in 1..max_chunk_len ({max_chunk_len})")
        self.max_chunk_len = max_chunk_len
        self.chunk_width = chunk_width
        self.norm = nn.LayerNorm(hidden_size)
        self.body = nn.Sequential(nn.Linear(hidden_size, gate_hidden), nn.GELU())
        self.commit = nn.Linear(gate_hidden, 1)
        self.length = nn.Linear(gate_hidden, max_chunk_len)
        self.reset_neutral()

    def reset_neutral(self) -> None:
        """Commit head: zero weight, bias -2; length head predicting the full chunk (class chunk_width - 1) for every input."""
        with torch.no_grad():
            self.commit.weight.zero_()
            nn.init.constant_(self.commit.bias, -2.0)
            self.length.weight.zero_()
            self.length.bias.zero_()
            if self.max_chunk_len > 1:
                self.length.bias[self.chunk_width - 1] = math.log(self.max_chunk_len - 1)

    def forward(self, summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """summary [B, H] -> (commit_logit [B], length_logits [B, max_chunk_len])."""
        x = self.body(self.norm(summary.to(self.commit.weight.dtype)))
        return self.commit(x).squeeze(-1), self.length(x)
