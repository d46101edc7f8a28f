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
            x = self.inp(self.norm(masked_mean(hidden, mask)))
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


class CellGroup:
    """The refine cells of the refined layers, run together: `deltas(states)` and `update(hiddens, mask, states)`
    for all of them at once, each the same as every cell's own delta / update (to float rounding).

    Why: the cells are small, so one after another each costs its few dozen kernel launches, not its arithmetic; in
    phase A on a GPU they were most of what was left outside the chunk passes' CUDA graphs (docs/benchmarks.md). Where
    every cell sits on one device, their parameters are stacked over the layers (once per chunk: gradients flow back
    to each cell's own) and each operation runs once for all layers (batched matmuls, one attention, one GRU); the
    states are then one tensor [L, ...]. Cells on several devices (a base spread over GPUs) run one by one, and the
    states are a list. The GRU is written out (PyTorch's GRUCell formula), as no batched GRU cell takes per-layer
    weights. Zero output projections still give exactly zero deltas.
    """

    def __init__(self, cells: list[RefineCell]) -> None:
        self.cells = cells
        first = cells[0]
        params = [dict(c.named_parameters()) for c in cells]
        self.stacked = len({p.device for c in params for p in c.values()}) == 1
        if self.stacked:
            self.w = {name: torch.stack([p[name] for p in params]) for name in params[0]}
            self.cell_type, self.d_state, self.eps = first.cell_type, first.d_state, first.norm.eps
            self.heads = getattr(first, "heads", 1)

    def deltas(self, states) -> list[torch.Tensor | None]:
        """Each layer's delta ([B, 1, H] pooled, else [B, W, H]); None before step 1 (states None)."""
        if states is None:
            return [None] * len(self.cells)
        if not self.stacked:
            return [cell.delta(s) for cell, s in zip(self.cells, states)]
        d = _linear(states, self.w["out_proj.weight"], self.w["out_proj.bias"])
        return list((d.unsqueeze(2) if self.cell_type == "pooled" else d).unbind(0))

    def update(self, hiddens: list[torch.Tensor], mask: torch.Tensor | None, states):
        """The next states from each layer's hidden states at the chunk positions (RefineCell.update per layer)."""
        if not self.stacked:
            return [cell.update(h, mask, s) for cell, h, s in
                    zip(self.cells, hiddens, states if states is not None else [None] * len(self.cells))]
        w = self.w
        hidden = torch.stack(hiddens).to(w["out_proj.weight"].dtype)  # [L, B, W, H]
        if self.cell_type == "pooled":
            hidden = masked_mean(hidden, mask)
        x = F.layer_norm(hidden, hidden.shape[-1:], eps=self.eps)
        x = x * _per_layer(w["norm.weight"], x) + _per_layer(w["norm.bias"], x)
        x = F.gelu(_linear(x, w["inp.0.weight"], w["inp.0.bias"]))
        if self.cell_type == "chunk_attention":
            x = x + self._attend(x, mask)
        if self.cell_type == "pooled":
            prev = x.new_zeros(*x.shape[:2], self.d_state) if states is None else states
            return self._gru(x, prev)
        prev = hidden.new_zeros(*hidden.shape[:3], self.d_state) if states is None else states
        new = self._gru(x, prev)
        if mask is not None:
            new = torch.where(mask.bool().unsqueeze(-1), new, prev)
        return new

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """RefineCell._attend for every layer at once: [L, B, W, g] -> [L, B, W, g]."""
        n_layers, b, w, g = x.shape
        qkv = _linear(x, self.w["qkv.weight"], self.w["qkv.bias"])
        q, k, v = qkv.view(n_layers * b, w, 3, self.heads, g // self.heads).permute(2, 0, 3, 1, 4)
        keys = None
        if mask is not None:
            valid = mask.bool() | ~mask.bool().any(-1, keepdim=True)
            keys = valid[:, None, None, :].repeat(n_layers, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        out = out.transpose(1, 2).reshape(n_layers, b, w, g)
        return _linear(out, self.w["mix.weight"], self.w["mix.bias"])

    def _gru(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """torch.nn.GRUCell's update for every layer at once, with each layer's weights."""
        gi = _linear(x, self.w["gru.weight_ih"], self.w["gru.bias_ih"])
        gh = _linear(h, self.w["gru.weight_hh"], self.w["gru.bias_hh"])
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over the chunk positions (dim -2) of hidden [..., B, W, H], valid positions only (mask [B, W]; None:
    all); a row with no valid position gives zero."""
    if mask is None:
        return hidden.mean(dim=-2)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=-2) / m.sum(dim=-2).clamp_min(1.0)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [L, ..., in] times each layer's weight [L, out, in] plus its bias [L, out]: [L, ..., out], one batched matmul."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _per_layer(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-layer vector [L, H] shaped to broadcast over `like` [L, ..., H]."""
    return t.view(t.shape[0], *([1] * (like.dim() - 2)), t.shape[-1])
