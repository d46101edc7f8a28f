"""Training and evaluation chunks that look like what inference refines, built from the prefix's cache snapshot.

`build_chunk` walks the chunk one token at a time on the base (recursion off), exactly as the seed step of
generation decodes: position j holds the true token (TRUE), the argmax (GREEDY) or a sample (SAMPLE) of the base's
prediction given the prefix and the chunk built so far (rkl.data.chunks.chunk_modes says which). The prefix is
never run again: the walk continues a copy of the snapshot's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rkl.data.chunks import GREEDY, SAMPLE
from rkl.model.cache import restore_cache
from rkl.model.static_decode import StaticDecoder


@dataclass
class Noise:
    """Where the Gumbel noise of a chunk's SAMPLE positions comes from: `generator` (CPU), drawn as for the whole
    batch with modes `modes` [N, W] (the global batch, in data parallel), of which the chunk holds `rows`. Drawn
    this way, a row's sample does not depend on how the batch is split across processes or grouped into walks."""

    generator: torch.Generator | None
    modes: torch.Tensor
    rows: slice | torch.Tensor = field(default_factory=lambda: slice(None))

    def count(self) -> int:
        """How many rows of the chunk this source's noise is for."""
        return len(range(self.modes.shape[0])[self.rows]) if isinstance(self.rows, slice) else len(self.rows)

    def draw(self, j: int, vocab: int) -> torch.Tensor | None:
        """[rows, vocab] uniforms for position j, or None where no row of the batch samples there (nothing drawn)."""
        if not bool((self.modes[:, j] == SAMPLE).any()):
            return None
        return torch.rand(self.modes.shape[0], vocab, generator=self.generator)[self.rows]


@torch.no_grad()
def build_chunk(wrapper: Any, snapshot: Any, prev_logits: torch.Tensor, targets: torch.Tensor, modes: torch.Tensor,
                generator: torch.Generator | None = None, noise: list[Noise] | None = None,
                decoder: StaticDecoder | None = None) -> torch.Tensor:
    """[B, W] chunk: targets where modes is TRUE, the base's greedy token where GREEDY, a sample where SAMPLE.

    prev_logits [B, V]: the base's logits at the last prefix position. Samples use the Gumbel-max trick with noise
    from `generator` (CPU), so a chunk is a pure function of (weights, prefix, targets at TRUE positions, seed).
    noise: instead of `generator`, the sources of the rows in order (see Noise): a slice of a global batch (data
    parallel), or several batches walked together (RefineTask's draft_walk_steps).
    decoder: run the decode steps through this static-cache decoder (a CUDA graph on a GPU) instead of eagerly.
    """
    base = wrapper.base
    b, w = targets.shape
    dev = targets.device
    p = snapshot.seq_length
    if p is None:
        raise ValueError("build_chunk needs a snapshot that records its prefix length")
    decode = decoder.start(snapshot) if decoder is not None else _eager_steps(base, snapshot, b, dev)
    sources = noise if noise is not None else [Noise(generator, modes.cpu())]
    if sum(src.count() for src in sources) != b:
        raise ValueError(f"the noise sources cover {sum(src.count() for src in sources)} rows, the chunk has {b}")
    sampling = modes == SAMPLE
    logits = prev_logits.float()
    toks = []
    for j in range(w):
        pick = logits.argmax(-1).to(dev)
        drawn = [src.draw(j, logits.shape[1]) for src in sources]  # the decision is on the host: no device sync
        if any(u is not None for u in drawn):
            # a source that draws nothing here has no SAMPLE row at j: its rows keep `pick`, whatever u says
            u = torch.cat([torch.ones(src.count(), logits.shape[1]) if d is None else d
                           for src, d in zip(sources, drawn)])
            u = u.clamp_(1e-20, 1.0).to(logits.device)
            pick = torch.where(sampling[:, j], (logits - torch.log(-torch.log(u))).argmax(-1).to(dev), pick)
        tok = torch.where((modes[:, j] == GREEDY) | sampling[:, j], pick, targets[:, j])
        toks.append(tok)
        if j + 1 < w:
            logits = decode(tok, p + j).float()
    return torch.stack(toks, 1)


def _eager_steps(base: Any, snapshot: Any, rows: int, dev: torch.device):
    """step(tokens [B], position) -> next-token logits [B, V]: the base's cached decode step on a copy of the
    snapshot's cache (what generate runs)."""
    cache = restore_cache(snapshot)

    def step(tok: torch.Tensor, position: int) -> torch.Tensor:
        pos = torch.full((rows, 1), position, dtype=torch.long, device=dev)
        return base(input_ids=tok[:, None], position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]

    return step
