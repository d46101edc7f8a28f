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

from rkl.data.chunks import SAMPLE, TRUE
from rkl.model.cache import restore_cache
from rkl.model.static_decode import StaticDecoder


@dataclass
class Noise:
    """Where the Gumbel noise of a chunk's SAMPLE positions comes from: a stream seeded from `generator` (CPU; None:
    the sampling device's default generator), drawn as for the whole batch with modes `modes` [N, W] (the global
    batch, in data parallel; host tensors), of which the chunk holds `rows`. Drawn this way, a row's sample does not
    depend on how the batch is split across processes or grouped into walks.

    The uniforms are drawn on the device that samples, only for the rows that sample at a position, from a generator
    there seeded once from `generator` (constructing a Noise takes one draw from it). So on a GPU the samples depend
    on the device's random stream: the same on the same kind of GPU, not across GPU models or against a CPU (as bf16
    kernels are not either). Drawn on the host for every row, as rkl did before, the noise of a 256-row walk took
    longer than the walk (docs/benchmarks.md, "The draft walk's sampling noise")."""

    generator: torch.Generator | None
    modes: torch.Tensor
    rows: slice | torch.Tensor = field(default_factory=lambda: slice(None))

    def __post_init__(self) -> None:
        # which rows sample is decided on the host at every position: modes on a device would sync each time
        self.modes = self.modes.cpu()
        rows = self.rows.cpu() if isinstance(self.rows, torch.Tensor) else self.rows
        self.mine = torch.arange(self.modes.shape[0])[rows]  # the chunk's rows, as rows of the global batch
        self.seed = None if self.generator is None else int(
            torch.randint(0, 2**63 - 1, (1,), generator=self.generator, device=self.generator.device))
        self._streams: dict[torch.device, torch.Generator] = {}

    def count(self) -> int:
        """How many rows of the chunk this source's noise is for."""
        return len(self.mine)

    def draw(self, j: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the chunk's rows that sample at position j [n], their uniforms [n, vocab]), both on `device`, or None
        where none of them does. The whole batch's sampling rows are drawn either way, so the stream stays the one
        the whole batch draws, whichever rows the chunk holds."""
        sampling = self.modes[:, j] == SAMPLE
        if not bool(sampling.any()):
            return None
        drawn = torch.rand(int(sampling.sum()), vocab, generator=self._stream(device), device=device)
        takes = sampling[self.mine]
        if not bool(takes.any()):
            return None
        order = torch.cumsum(sampling, 0) - 1  # a sampling row's index among the drawn ones
        return _to_device(takes.nonzero()[:, 0], device), drawn[_to_device(order[self.mine[takes]], device)]

    def _stream(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        device = torch.device(device)
        if device not in self._streams:
            self._streams[device] = torch.Generator(device=device)
            self._streams[device].manual_seed(self.seed)
        return self._streams[device]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the device: a copy from pageable memory synchronizes the
    stream, which in the graphed walk would leave the GPU idle at every sampled position while the host catches up."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def build_chunk(wrapper: Any, snapshot: Any, prev_logits: torch.Tensor, targets: torch.Tensor, modes: torch.Tensor,
                generator: torch.Generator | None = None, noise: list[Noise] | None = None,
                decoder: StaticDecoder | None = None) -> torch.Tensor:
    """[B, W] chunk: targets where modes is TRUE, the base's greedy token where GREEDY, a sample where SAMPLE.

    prev_logits [B, V]: the base's logits at the last prefix position. Samples use the Gumbel-max trick with noise
    seeded from `generator` (CPU; see Noise), so on one kind of device a chunk is a pure function of (weights,
    prefix, targets at TRUE positions, seed).
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
    sources = noise if noise is not None else [Noise(generator, modes)]
    if sum(src.count() for src in sources) != b:
        raise ValueError(f"the noise sources cover {sum(src.count() for src in sources)} rows, the chunk has {b}")
    # the sources decide which rows get noise: they must sample where the chunk's modes do (one host copy a walk)
    if not torch.equal(torch.cat([src.modes[src.mine] for src in sources]) == SAMPLE, modes.cpu() == SAMPLE):
        raise ValueError("the noise sources' modes do not sample where the chunk's modes do")
    logits = prev_logits.float()
    toks = []
    for j in range(w):
        pick = logits.argmax(-1).to(dev)
        # which rows sample is decided on the host (no device sync); their uniforms are drawn on the logits' device
        rows, uniforms, offset = [], [], 0
        for src in sources:
            drawn = src.draw(j, logits.shape[1], logits.device)
            if drawn is not None:
                rows.append(drawn[0] + offset)
                uniforms.append(drawn[1])
            offset += src.count()
        if rows:
            rows = torch.cat(rows).to(dev)
            gumbel = -torch.log(-torch.log(torch.cat(uniforms).clamp_(1e-20, 1.0)))
            pick = pick.index_copy(0, rows, (logits[rows.to(logits.device)] + gumbel).argmax(-1).to(dev))
        tok = torch.where(modes[:, j] != TRUE, pick, targets[:, j])
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
