"""Training and evaluation chunks that look like what inference refines, built from the prefix's cache snapshot.

`build_chunk` walks the chunk one token at a time on the base (recursion off), exactly as the seed step of
generation decodes: position j holds the true token (TRUE), the argmax (GREEDY) or a sample (SAMPLE) of the base's
prediction given the prefix and the chunk built so far (rkl.data.chunks.chunk_modes says which). The prefix is
never run again: the walk continues a copy of the snapshot's cache.
"""

from __future__ import annotations

from typing import Any

import torch

from rkl.data.chunks import GREEDY, SAMPLE
from rkl.model.cache import restore_cache


@torch.no_grad()
def build_chunk(wrapper: Any, snapshot: Any, prev_logits: torch.Tensor, targets: torch.Tensor, modes: torch.Tensor,
                generator: torch.Generator | None = None, shard: tuple[slice, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """[B, W] chunk: targets where modes is TRUE, the base's greedy token where GREEDY, a sample where SAMPLE.

    prev_logits [B, V]: the base's logits at the last prefix position. Samples use the Gumbel-max trick with noise
    from `generator` (CPU), so a chunk is a pure function of (weights, prefix, targets at TRUE positions, seed).
    shard = (rows, global_modes): these rows are that slice of a global batch with `global_modes` (data parallel):
    the noise is drawn as for the global batch, so a row's sample does not depend on how the batch is split.
    """
    base = wrapper.base
    b, w = targets.shape
    dev = targets.device
    cache, p = restore_cache(snapshot), snapshot.seq_length
    if p is None:
        raise ValueError("build_chunk needs a snapshot that records its prefix length")
    logits = prev_logits.float()
    toks = []
    for j in range(w):
        pick = logits.argmax(-1).to(dev)
        every = modes if shard is None else shard[1]
        if bool((every[:, j] == SAMPLE).any()):
            u = torch.rand(every.shape[0], logits.shape[1], generator=generator)
            if shard is not None:
                u = u[shard[0]]
            u = u.clamp_(1e-20, 1.0).to(logits.device)
            pick = torch.where(modes[:, j] == SAMPLE, (logits - torch.log(-torch.log(u))).argmax(-1).to(dev), pick)
        tok = torch.where((modes[:, j] == GREEDY) | (modes[:, j] == SAMPLE), pick, targets[:, j])
        toks.append(tok)
        if j + 1 < w:
            pos = torch.full((b, 1), p + j, dtype=torch.long, device=dev)
            logits = base(input_ids=tok[:, None], position_ids=pos, past_key_values=cache,
                          use_cache=True).logits[:, -1].float()
    return torch.stack(toks, 1)
