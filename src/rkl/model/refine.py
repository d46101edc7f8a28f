"""RefineCell: one decoder layer's recurrent refiner, the source of that layer's residual delta.

Step protocol (driven by ChunkRefineWrapper.refine_chunk, inner steps t = 1..K):

- the state starts as None (= zero) at every chunk; `delta(None)` is None, so inner step 1 adds nothing to the
  layer output and runs the unrefined base model bitwise, whatever the cell has learned. Step 1 is the reference
  the token edit rule compares against (see wrapper.py);
- at step t the layer's forward hook adds `delta(state_{t-1})` to the layer output at the chunk positions;
- after the step's forward, `update(hidden, mask, state)` reads that step's (refined) hidden states of the layer
  and returns state_t.

Two variants, chosen by `RecursiveConfig.refine_cell_type`:

- 'pooled' (the spec, default): mean-pool the chunk's hidden states over valid positions -> LayerNorm -> MLP
  (gate_hidden) -> GRUCell state [B, d_state] -> out_proj -> ONE delta [B, 1, hidden] broadcast over the chunk;
- 'per_token': the same per position: state [B, W, d_state], delta [B, W, hidden].

`out_proj` (weight and bias) starts at zero: any delta is exactly zero at init, and adding a zero tensor is bitwise
exact, so surgery changes nothing until training moves it.
"""

from __future__ import annotations

import torch
from torch import nn

CELL_TYPES = ("pooled", "per_token")


class RefineCell(nn.Module):
    def __init__(self, hidden_size: int, d_state: int = 64, gate_hidden: int = 64, cell_type: str = "pooled") -> None:
        super().__init__()
        if cell_type not in CELL_TYPES:
            raise ValueError(f"cell_type must be one of {CELL_TYPES}, got {cell_type!r}")
        self.hidden_size = hidden_size
        self.d_state = d_state
        self.cell_type = cell_type
        # The residual stream of a deep model has a large and layer-dependent scale: normalise before the MLP.
        self.norm = nn.LayerNorm(hidden_size)
        self.inp = nn.Sequential(nn.Linear(hidden_size, gate_hidden), nn.GELU())
        self.gru = nn.GRUCell(gate_hidden, d_state)
        self.out_proj = nn.Linear(d_state, hidden_size)
        self.reset_output()

    def reset_output(self) -> None:
        """Zero the output projection: the neutral (surgery) initialisation."""
        with torch.no_grad():
            self.out_proj.weight.zero_()
            self.out_proj.bias.zero_()

    def delta(self, state: torch.Tensor | None) -> torch.Tensor | None:
        """The delta to add to the layer output: [B, 1, H] (pooled) or [B, W, H] (per_token); None before step 1."""
        if state is None:
            return None
        d = self.out_proj(state)
        return d.unsqueeze(1) if self.cell_type == "pooled" else d

    def update(self, hidden: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor | None) -> torch.Tensor:
        """The next state from this step's hidden states `hidden` [B, W, H] at the chunk positions.

        `mask` [B, W] marks valid (non-padding) positions; None = all valid. A row with no valid position pools to
        zero. In the per-token variant invalid positions keep their previous state.
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
        x = self.inp(self.norm(hidden)).reshape(b * w, -1)
        prev = hidden.new_zeros(b, w, self.d_state) if state is None else state
        new = self.gru(x, prev.reshape(b * w, self.d_state)).reshape(b, w, self.d_state)
        if mask is not None:
            new = torch.where(mask.bool().unsqueeze(-1), new, prev)
        return new
