"""LatentToken: a learned [Z] embedding appended AFTER the chunk's W positions on inner refinement steps.

Causal attention (MLA), the causal conv and the KDA recurrence all run left to right, so a position appended at
the end is invisible to every text position, while [Z] itself attends to the whole prefix and chunk. The wrapper
feeds [Z] as a separate one-position forward that continues the inner step's working cache right after the chunk:
appending it to the chunk's own forward would be causally equivalent but not bitwise (a longer sequence changes
GEMM and MoE grouping shapes, hence rounding), and the text logits are promised, and tested, bitwise unchanged. Its final hidden state is the boundary head's summary. [Z] exists only
inside inner steps: it is never part of a committed cache (commits either adopt the seeded cache, which never saw
it, or re-advance the chunk-start snapshot by the committed text tokens).
"""

from __future__ import annotations

import torch
from torch import nn


class LatentToken(nn.Module):
    def __init__(self, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(hidden_size) * init_std)

    def forward(self, batch_size: int) -> torch.Tensor:
        """[B, 1, H]: the [Z] embedding for every row."""
        return self.embedding.view(1, 1, -1).expand(batch_size, 1, -1)
