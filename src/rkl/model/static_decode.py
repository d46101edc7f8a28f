"""The draft walk's decode step over a static cache, replayed as one CUDA graph on a GPU.

Why: the draft walk (rkl.model.drafts.build_chunk) is W - 1 cached single-token decode steps of the base, and on a
GPU each step costs its kernel launches, not its arithmetic: profiled on one H200 (small preset, 2026-12-04,
docs/benchmarks.md), 1,181 launches and 30-48 ms of wall time per step for about 3-5.5 ms of GPU work. A CUDA graph
replays all of a step's kernels with one launch.

A graph replays fixed addresses and cannot wait on the host, so every tensor the step touches must live in one place
for the whole walk:
- KDA layers: transformers' `LinearAttentionLayer` already updates its conv and recurrent states in place (it does
  so for CUDA graphs); the decoder keeps one such layer per KDA layer and copies each walk's snapshot into it.
- MLA layers: transformers' `StaticLayer`, keys and values preallocated for `max_len` tokens and written at a
  device-side counter; a walk copies its prefix's latents in and sets the counter to the prefix length.
- the attention mask: built inside the step from a device-side position (key index <= the position being
  written) and handed to the model as transformers' per-layer-type mask dict, so no host-side mask logic runs.
One graph per (rows, training mode, autocast dtype), all at `max_len` (phase A's seq_len: a prefix and its chunk
never exceed it). Starting a walk costs a few device copies (the KDA states and the prefix latents), none per token.

Numerics: attention runs over all `max_len` keys with those past the current position masked, where the eager walk
runs over exactly prefix + j keys, so on a GPU the logits can differ from the eager walk's in the last bits (bf16)
and a greedy draft can differ where two logits tie to that precision. The agreement is measured
(scripts/bench_static_decode.py, docs/benchmarks.md). On a CPU there is no graph: the same static-cache step runs
eagerly, and tests compare it with the eager walk.

Used for phase A's frozen, unsharded base only. A graph bakes in what its capture ran: FSDP's all-gathers (hooks
that allocate and communicate) cannot be replayed, and a base that trains (LoRA, unfrozen layers) was not measured
with one, so rkl.train.refine_phases walks eagerly there. Where a capture fails anyway (an operation that waits on
the host, under a setting not measured), the decoder says so once and runs the same step eagerly. One such setting
is known beforehand (`graph_blocker`): routed experts that are not bf16, such as a float32 base under bf16 autocast;
phase A then walks eagerly and run.json says why.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin, StaticLayer

from rkl.model.cache import CacheSnapshot, restore_cache


class _StaticLatentLayer(StaticLayer):
    """transformers' StaticLayer keeping the snapshot's dtypes, as the eager cache does. Under autocast a float32
    base's MLA latents come in mixed dtypes: a prefix pass leaves both parts float32, a decode step's rope part is
    bf16, and the eager cache's torch.cat promotes it to float32; StaticLayer would allocate both buffers in the keys'
    dtype and index_copy_ refuses a source of another dtype."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.values = torch.zeros_like(self.values, dtype=value_states.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(key_states.to(self.keys.dtype), value_states.to(self.values.dtype), *args, **kwargs)


def copy_padded(buffer: torch.Tensor, latents: torch.Tensor) -> None:
    """Copy a prefix's MLA latents [..., p, d] into the front of a longer buffer [..., max_len, d] and zero the rest:
    what an earlier, longer prefix left there is masked, but a masked NaN still poisons the attention."""
    p = latents.shape[-2]
    buffer[..., :p, :].copy_(latents)
    buffer[..., p:, :].zero_()


def graph_blocker(base: torch.nn.Module) -> str | None:
    """Why the base's decode step cannot be captured as a CUDA graph, where that is known beforehand, or None. With
    transformers' default experts implementation the routed experts run through PyTorch's grouped_mm, whose
    graph-safe kernel takes bf16 weights only; for float32 experts (a float32 base under bf16 autocast: grouped_mm is
    not an autocast op, so they stay float32) it falls back to a loop over the groups that copies the group offsets
    to the host, which a capture refuses (found on an H100, 2026-12-06; tests/test_static_decode.py checks it on a
    GPU). Other experts implementations are left to the capture itself (start() falls back if it fails)."""
    if getattr(base.config, "_experts_implementation", None) != "grouped_mm":
        return None
    # peft's wrappers put `base_layer` segments between `experts` and the weight's name
    dtypes = {p.dtype for name, p in base.named_parameters()
              if ".experts." in name and name.endswith(("gate_up_proj", "down_proj"))}
    if dtypes - {torch.bfloat16}:
        return (f"routed experts in {', '.join(sorted(str(d)[6:] for d in dtypes - {torch.bfloat16}))}: PyTorch's "
                "grouped_mm has a graph-safe kernel for bf16 weights only (a bf16 base, e.g. --dtype bfloat16, walks "
                "as a graph)")
    return None


def graph_by_default(base: torch.nn.Module, device: torch.device) -> bool:
    """Whether a StaticDecoder on `device` captures graphs unless told otherwise: on CUDA, where nothing known
    blocks it."""
    return device.type == "cuda" and graph_blocker(base) is None


# Slots kept at once: training's walk and validation's (another row count, eval mode). Each holds KDA states for its
# rows (about 40 MiB a row at the 48B widths) and a graph's memory; a third kind (a short last group) evicts one.
MAX_SLOTS = 2


@dataclass
class _Slot:
    """Everything one graph reads and writes, at fixed addresses."""

    cache: Any  # a DynamicCache whose MLA layers are StaticLayers
    input_ids: torch.Tensor  # [B, 1]
    position: torch.Tensor  # [] long: the position being written this step
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [B, V]: the captured step's output (the graph overwrites it each replay)


class StaticDecoder:
    """`start(snapshot)` loads a cache snapshot into static buffers and returns `step(tokens [B], position) -> logits
    [B, V]`: the base's next-token logits after feeding `tokens` at `position` (prefix length, then +1 per step).
    The logits are the graph's output buffer: use them before the next step. graph: capture CUDA graphs (default:
    on a CUDA device, unless graph_blocker names a reason); False runs the same static-cache step eagerly."""

    def __init__(self, base: torch.nn.Module, max_len: int, graph: bool | None = None) -> None:
        self.base = base
        self.max_len = max_len
        self.device = next(base.parameters()).device
        self.graph = graph_by_default(base, self.device) if graph is None else graph
        self.slots: dict[tuple, _Slot] = {}
        self.key_index = torch.arange(max_len, device=self.device)  # what the mask compares the position with
        self.captures = 0  # graphs captured so far (a benchmark reports it)

    def start(self, snapshot: CacheSnapshot) -> Callable[[torch.Tensor, int], torch.Tensor]:
        prefix = snapshot.seq_length
        if prefix is None or prefix >= self.max_len:
            raise ValueError(f"a static walk needs a snapshot with a prefix length below max_len {self.max_len}, "
                             f"got {prefix}")
        rows = snapshot.batch_size
        autocast = (torch.is_autocast_enabled(self.device.type),
                    torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else None)
        key = (rows, self.base.training, *autocast)  # what a capture bakes in besides the shapes
        slot = self.slots.pop(key, None)
        if slot is None:
            while len(self.slots) >= MAX_SLOTS:  # the least recently used goes, with its buffers and graph
                del self.slots[next(iter(self.slots))]
            slot = self._new_slot(snapshot)
            if self.graph:
                try:
                    self._capture(slot, snapshot)
                except RuntimeError as e:  # e.g. a kernel that waits on the host: the same step runs eagerly
                    self.graph, slot.graph = False, None
                    print(f"rkl: the draft walk could not be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                          "it runs eagerly", file=sys.stderr, flush=True)
        self.slots[key] = slot  # most recently used last
        self._load(slot, snapshot)
        expected = [prefix]

        def step(tokens: torch.Tensor, position: int) -> torch.Tensor:
            if position != expected[0] or position >= self.max_len:
                raise ValueError(f"static decode steps go one position at a time from the prefix up to max_len "
                                 f"{self.max_len}: expected {expected[0]}, got {position}")
            expected[0] += 1
            slot.input_ids.copy_(tokens.view(-1, 1))
            slot.position.fill_(position)
            if slot.graph is not None:
                slot.graph.replay()
                return slot.logits
            return self._forward(slot)

        return step

    # -------------------------------------------------------------------------------------------- internals
    def _new_slot(self, snapshot: CacheSnapshot) -> _Slot:
        cache = restore_cache(snapshot)  # plain KDA layers (in-place updates), cloned: this slot's own tensors
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                continue
            static = _StaticLatentLayer(max_cache_len=self.max_len)
            static.lazy_initialization(layer.keys, layer.values)  # zeros: masked keys must stay finite
            cache.layers[i] = static
        rows = snapshot.batch_size
        return _Slot(cache=cache, input_ids=torch.zeros(rows, 1, dtype=torch.long, device=self.device),
                     position=torch.zeros((), dtype=torch.long, device=self.device))

    @staticmethod
    def _load(slot: _Slot, snapshot: CacheSnapshot) -> None:
        """Copy the snapshot into the slot's tensors (their addresses stay)."""
        for layer, (_, attrs) in zip(slot.cache.layers, snapshot.layers):
            if isinstance(layer, StaticLayer):
                copy_padded(layer.keys, attrs["keys"])
                copy_padded(layer.values, attrs["values"])
                layer.cumulative_length.fill_(attrs["keys"].shape[-2])
            else:
                for name in ("conv_states", "recurrent_states"):
                    stored = getattr(layer, name)
                    for k, t in attrs[name].items():
                        stored[k].copy_(t)

    def _forward(self, slot: _Slot) -> torch.Tensor:
        rows = slot.input_ids.shape[0]
        visible = (self.key_index <= slot.position).view(1, 1, 1, -1).expand(rows, 1, 1, -1)
        out = self.base(input_ids=slot.input_ids, position_ids=slot.position.expand(rows, 1),
                        past_key_values=slot.cache, use_cache=True,
                        attention_mask={"full_attention": visible, "linear_attention": None})
        return out.logits[:, -1]

    def _capture(self, slot: _Slot, snapshot: CacheSnapshot) -> None:
        """Warm up on a side stream (kernel autotuning, cuBLAS workspaces), then capture one step. The warm-up moves
        the slot's state on (capturing runs no kernel): start() loads the snapshot after this."""
        prefix = snapshot.seq_length
        slot.position.fill_(prefix)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(slot)
        torch.cuda.current_stream().wait_stream(side)
        slot.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(slot.graph):
            slot.logits = self._forward(slot)
        self.captures += 1
