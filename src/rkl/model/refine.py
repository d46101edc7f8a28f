"""RefineCell: one decoder layer's recurrent refiner, the source of that layer's residual delta.

Step protocol (driven by ChunkRefineWrapper.refine_chunk, inner steps t = 1..K):

- the state starts as None (= zero) at every chunk; `delta(None)` is None, so inner step 1 adds nothing to the
  layer output and runs the unrefined base model bitwise, whatever the cell has learned. Step 1 is the reference
  the token edit rule compares against (see wrapper.py);
- at step t the layer's forward hook adds `delta(state_{t-1})` to the layer output at the chunk positions;
- after the step's forward, `update(hidden, mask, state)` reads that step's (refined) hidden states of the layer
  and returns state_t.

Three variants, chosen by `RecursiveConfig.refine_cell_type`. What each lets chunk position j read matters: the
decoder is causal, so the layer's hidden state at j depends only on chunk tokens <= j, and a refined chunk helps
only where an early token depends on later ones (the MSD-first carry):

- 'pooled' (the spec): mean-pool the chunk's hidden states over valid positions -> LayerNorm -> MLP (gate_hidden)
  -> GRUCell state [B, d_state] -> out_proj -> ONE delta [B, 1, hidden] broadcast over the chunk. Position j
  reads later tokens only through that one mean vector;
- 'per_token': the same per position: state [B, W, d_state], delta [B, W, hidden]. Position j's delta depends on
  its own (causal) hidden state only: it can never read a later draft token;
- 'chunk_attention' (default of the phase configs): per position as per_token, but the GRU input is the position's
  own features plus a non-causal attention over the features of every valid chunk position (`heads` heads of
  width gate_hidden / heads). Position j's delta depends on the whole chunk. Cost per layer and step:
  O(W^2 * gate_hidden) for the attention plus O(W * hidden * gate_hidden) for the projections.

`out_proj` (weight and bias) starts at zero: any delta is exactly zero at init, and adding a zero tensor is bitwise
exact, so surgery changes nothing until training moves it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CELL_TYPES = ("pooled", "per_token", "chunk_attention")


class RefineCell(nn.Module):
    def __init__(self, hidden_size: int, d_state: int = 64, gate_hidden: int = 64, cell_type: str = "pooled",
                 heads: int = 4) -> None:
        super().__init__()
        if cell_type not in CELL_TYPES:
            raise ValueError(f"cell_type must be one of {CELL_TYPES}, got {cell_type!r}")
        self.hidden_size = hidden_size
        self.d_state = d_state
        self.cell_type = cell_type
        # The residual stream of a deep model has a large and layer-dependent scale: normalise before the MLP.
        self.norm = nn.LayerNorm(hidden_size)
        self.inp = nn.Sequential(nn.Linear(hidden_size, gate_hidden), nn.GELU())
        if cell_type == "chunk_attention":
            self.heads = heads if gate_hidden % heads == 0 else 1
            self.qkv = nn.Linear(gate_hidden, 3 * gate_hidden)
            self.mix = nn.Linear(gate_hidden, gate_hidden)
        self.gru = nn.GRUCell(gate_hidden, d_state)
        self.out_proj = nn.Linear(d_state, hidden_size)
        self.reset_output()

    def reset_output(self) -> None:
        """Zero the output projection: the neutral (surgery) initialisation."""
        with torch.no_grad():
            self.out_proj.weight.zero_()
            self.out_proj.bias.zero_()

    def delta(self, state: torch.Tensor | None) -> torch.Tensor | None:
        """The delta to add to the layer output: [B, 1, H] (pooled) or [B, W, H]; None before step 1."""
        if state is None:
            return None
        d = self.out_proj(state)
        return d.unsqueeze(1) if self.cell_type == "pooled" else d

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Non-causal multi-head attention of every chunk position over the valid ones: [B, W, g] -> [B, W, g]."""
        b, w, g = x.shape
        q, k, v = self.qkv(x).view(b, w, 3, self.heads, g // self.heads).permute(2, 0, 3, 1, 4)
        keys = None
        if mask is not None:  # a row without any valid position attends to everything (its output is unused)
            valid = mask.bool() | ~mask.bool().any(-1, keepdim=True)
            keys = valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        return self.mix(out.transpose(1, 2).reshape(b, w, g))

    def update(self, hidden: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor | None) -> torch.Tensor:
        """The next state from this step's hidden states `hidden` [B, W, H] at the chunk positions.

        `mask` [B, W] marks valid (non-padding) positions; None = all valid. A row with no valid position pools to
        zero. In the per-position variants invalid positions keep their previous state.
        """
        hidden = hidden.to(self.out_proj.weight.dtype)
        if self.cell_type == "pooled":
            if mask is None:
                pooled = hidden.mean(dim=1)
            else:
                m = mask.to(hidden.dtype).unsqueeze(-1)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
            x = self.inp(self.norm(pooled))
            if state is None:
                state = x.new_zeros(x.shape[0], self.d_state)
            return self.gru(x, state)
        b, w, h = hidden.shape
        x = self.inp(self.norm(hidden))
        if self.cell_type == "chunk_attention":
            x = x + self._attend(x, mask)
        prev = hidden.new_zeros(b, w, self.d_state) if state is None else state
        new = self.gru(x.reshape(b * w, -1), prev.reshape(b * w, self.d_state)).reshape(b, w, self.d_state)
        if mask is not None:
            new = torch.where(mask.bool().unsqueeze(-1), new, prev)
        return new
