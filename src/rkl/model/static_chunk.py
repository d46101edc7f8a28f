"""The inner steps' chunk passes over a static prefix cache, forward and backward replayed as CUDA graphs.

Why: in phase A on a GPU the K chunk passes and their backward cost their kernel launches, not their work: on one
H100 (small preset, batch 8, W 64, K 4; docs/benchmarks.md, 2026-12-06) 0.485 s of wall for 0.057 s of kernels,
13,358 launches. A CUDA graph replays a pass's kernels with one launch, its backward with another.

A graph replays fixed shapes and addresses, and phase A's prefix length changes from batch to batch, so the pass
reads its prefix from buffers sized for the longest prefix (`max_prefix`, phase A's seq_len - W):
- KDA layers: the snapshot's conv and recurrent states copied into fixed tensors. The pass only reads them (the
  grad-friendly cache of rkl.model.cache assigns its updates to new tensors), so all K steps share one copy;
- MLA layers: the prefix latents copied into zero-padded [.., max_prefix, ..] buffers; transformers' DynamicLayer
  appends the chunk's latents behind them (`torch.cat`), so the chunk's W keys sit at max_prefix.. and the padding
  between prefix and chunk is masked. Attention does not care where a key sits, only its mask: Kimi-Linear's MLA
  applies no RoPE (NoPE), and the position ids (prefix length + j, computed on the device) are passed as the eager
  pass passes them;
- the mask: key i is visible to chunk position j when i < prefix length (a device-side number) or i is chunk key
  <= j, built inside the pass and handed to the model as transformers' per-layer-type mask dict.
Loading a snapshot is a few device copies per chunk (O(max_prefix) for the MLA latents), none per step.

One graphed callable per inner step (torch.cuda.make_graphed_callables, captured together in one memory pool, in
the order the steps run): step t's forward graph holds its activations until its backward graph runs, which is what
refine_chunk's loss.backward() needs. Step 1 adds no deltas and has no backward; steps 2..K take each refined
layer's delta as an input and return its gradient. One set of graphs at a time, for one (rows, K, W, training mode,
autocast dtype); validation (no gradient) runs the ordinary eager passes.

Numerics: attention runs over max_prefix + W keys with the padding masked, where the eager pass runs over exactly
prefix + W, so on a GPU in bf16 the hidden states round differently from the eager pass's (the same trade as
rkl.model.static_decode), and a random-weight model amplifies such differences layer by layer, as it does between
any two of rkl's bf16 paths (the chunked and the one-token KDA kernels, say). Training then sees the static pass's
rounding; validation and generation the eager pass's. In float32 on a CPU the two agree to 1e-4 (tests), and a
GPU test checks that the graphs replay the static passes bitwise.

Contract: each forward with gradient must be followed by its backward before the next refine_chunk with gradient
(the training loop's micro-batches do this); a second forward first would overwrite the saved activations, the
fixed KDA states and the output buffers, silently under a graph. start() refuses it: a hook on step 2's first delta
marks the backward done. The masks are boolean, which transformers' SDPA attention
reads as "visible" (its eager attention would add them to the scores): only an SDPA base is accepted.

Used for phase A's frozen, unsharded base with bf16 routed experts only (rkl.model.static_decode.graph_blocker): a
graph bakes in what its capture ran, so FSDP's all-gathers or a base that trains (LoRA, unfrozen layers) cannot be
replayed, and the graphed passes are plain functions whose only differentiable inputs are the deltas: a base
weight that requires grad would get none, so start() refuses such a base. Where a capture fails anyway,
refine_chunk is told once (stderr) and runs its eager passes.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from rkl.model.cache import CacheSnapshot, restore_cache
from rkl.model.static_decode import copy_padded, graph_by_default

StepFn = Callable[[int, torch.Tensor, list], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]


def attention_blocker(base: torch.nn.Module) -> str | None:
    """Why the static passes cannot run on `base`'s attention, or None: their masks are boolean, which transformers'
    SDPA attention reads as "visible" and its eager attention would add to the scores."""
    attention = getattr(base.config, "_attn_implementation", None)
    if attention != "sdpa":
        return f"static chunk passes need the base's attention to be 'sdpa' (boolean masks), got {attention!r}"
    return None


class StaticChunkPasses:
    """`start(wrapper, snapshot, k_steps, width, x)` loads a chunk-start snapshot into the static buffers and returns
    `step(t, x, deltas) -> (final hidden states [B, W, H], per refined layer its hidden states at the chunk
    positions)`: inner step t's chunk pass (t = 0 takes no deltas). Or None where the graphs cannot be used (a
    capture failed once). graph: capture CUDA graphs (default: on a CUDA device unless graph_blocker names a reason); False runs the same
    static passes eagerly (CPU tests)."""

    def __init__(self, base: torch.nn.Module, max_prefix: int, graph: bool | None = None) -> None:
        blocker = attention_blocker(base)
        if blocker:
            raise ValueError(blocker)
        self.base = base
        self.max_prefix = max_prefix
        self.device = next(base.parameters()).device
        self.graph = graph_by_default(base, self.device) if graph is None else graph
        self.failed: str | None = None  # why the graphs were given up, once a capture failed
        self.key: tuple | None = None  # what the current buffers, passes and graphs were made for
        self.kda: list[tuple[int, str, Any, torch.Tensor]] = []  # (layer, state dict name, key, fixed tensor)
        self.mla: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, keys, values), max_prefix long
        self.prefix_len = torch.zeros((), dtype=torch.long, device=self.device)
        self.key_index = torch.arange(max_prefix, device=self.device)
        self.passes: list[Callable] = []  # one per inner step, eager
        self.steps: list[Callable] | None = None  # the same, graphed
        self.captures = 0  # sets of graphs captured so far (a benchmark reports it)
        self.awaiting_backward = False  # a forward with gradient ran and its backward has not reached step 2 yet

    # ------------------------------------------------------------------------------------------------ use
    def start(self, wrapper: Any, snapshot: CacheSnapshot, k_steps: int, width: int, x: torch.Tensor
              ) -> StepFn | None:
        if self.failed is not None:
            return None
        if self.awaiting_backward:
            raise RuntimeError("the static chunk passes ran forward with gradient and were started again before that "
                               "backward: their buffers hold what the backward needs; call backward first")
        if any(p.requires_grad for p in self.base.parameters()):
            raise ValueError("static chunk passes take gradients for the deltas only: freeze the base first")
        prefix = snapshot.seq_length
        if prefix is None or prefix > self.max_prefix:
            raise ValueError(f"a static chunk pass needs a snapshot with a prefix of at most {self.max_prefix} "
                             f"tokens, got {prefix}")
        device_type = self.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        # what a capture bakes in: the wrapper its passes run (hooks, cells), every shape and dtype (the deltas'
        # follow from the cells, the rows and the autocast)
        key = (id(wrapper), snapshot.batch_size, k_steps, width, wrapper.training, autocast, x.dtype,
               next(wrapper.refine_cells.parameters()).dtype)
        if key != self.key:
            self.key = self.steps = None
            self._allocate(snapshot)
            self.passes = [self._chunk_pass(wrapper, snapshot, width) for _ in range(k_steps)]
            self.key = key
        self._load(snapshot)
        if self.graph and self.steps is None:
            try:
                self.steps = self._capture(x, wrapper._delta_samples(snapshot.batch_size, width, x.device))
            except (RuntimeError, ValueError, AssertionError) as e:  # e.g. a kernel that waits on the host
                self.failed = str(e).splitlines()[0]
                self.key = self.steps = None
                print(f"rkl: the inner steps' chunk passes could not be captured as CUDA graphs ({self.failed}); "
                      "they run eagerly", file=sys.stderr, flush=True)
                return None
            self._load(snapshot)  # the capture's warm-up ran over the buffers
        run = self.steps if self.graph else self.passes

        def step(t: int, x: torch.Tensor, deltas: list) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            if t == 1 and deltas[0].requires_grad:  # step 2's backward is the last to run
                self.awaiting_backward = True
                deltas[0].register_hook(self._backward_done)
            out = run[t](x) if t == 0 else run[t](x, *deltas)
            return out[0], tuple(out[1:])

        return step

    # -------------------------------------------------------------------------------------------- internals
    def _backward_done(self, grad: torch.Tensor) -> None:
        self.awaiting_backward = False

    def _allocate(self, snapshot: CacheSnapshot) -> None:
        """Fixed tensors shaped like the snapshot's, the MLA ones max_prefix long."""
        self.kda, self.mla = [], []
        for i, (cls, attrs) in enumerate(snapshot.layers):
            if issubclass(cls, LinearAttentionCacheLayerMixin):
                for name in ("conv_states", "recurrent_states"):
                    for k, t in attrs[name].items():
                        if torch.is_tensor(t):
                            self.kda.append((i, name, k, torch.empty_like(t)))
            elif torch.is_tensor(attrs.get("keys")) and attrs["keys"].dim() > 1:
                keys, values = attrs["keys"], attrs["values"]
                shape = lambda t: (*t.shape[:-2], self.max_prefix, t.shape[-1])  # noqa: E731
                self.mla.append((i, keys.new_zeros(shape(keys)), values.new_zeros(shape(values))))

    def _load(self, snapshot: CacheSnapshot) -> None:
        for i, name, k, fixed in self.kda:
            fixed.copy_(snapshot.layers[i][1][name][k])
        for i, keys, values in self.mla:
            copy_padded(keys, snapshot.layers[i][1]["keys"])
            copy_padded(values, snapshot.layers[i][1]["values"])
        self.prefix_len.fill_(snapshot.seq_length)

    def _rebind(self, cache: Any) -> Any:
        """Point `cache` at the fixed tensors again: a pass rebinds its KDA states and appends to its MLA latents."""
        for i, name, k, fixed in self.kda:
            getattr(cache.layers[i], name)[k] = fixed
        for i, keys, values in self.mla:
            cache.layers[i].keys, cache.layers[i].values = keys, values
        return cache

    def _chunk_pass(self, wrapper: Any, snapshot: CacheSnapshot, width: int) -> Callable:
        """One inner step's chunk pass as a function of tensors only (what a graph captures)."""
        from rkl.model.wrapper import _Pass  # the wrapper imports this module

        layers = wrapper.layers_to_refine
        rows = snapshot.batch_size
        cache = self._rebind(restore_cache(snapshot, grad_friendly=True))  # its flags; its tensors are ours
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        offsets = torch.arange(width, device=self.device)

        def chunk_pass(x: torch.Tensor, *deltas: torch.Tensor) -> tuple[torch.Tensor, ...]:
            prefix_visible = (self.key_index < self.prefix_len).expand(width, -1)
            visible = torch.cat([prefix_visible, causal], -1).expand(rows, 1, -1, -1)
            positions = (self.prefix_len + offsets).expand(rows, -1)
            state = _Pass(dict(zip(layers, deltas or [None] * len(layers))), start=0, width=width)
            hidden = wrapper._run(x, {"full_attention": visible, "linear_attention": None}, positions,
                                  self._rebind(cache), state)
            self._rebind(cache)  # let go of this pass's appended latents and final KDA states
            return (hidden, *(state.hidden[i] for i in layers))

        return chunk_pass

    def _capture(self, x: torch.Tensor, delta_samples: list[torch.Tensor]) -> list[Callable]:
        """All K passes captured in one pool, in the order they run (forward 1..K, backward K..2)."""
        samples = [(torch.zeros_like(x),)] + [
            (torch.zeros_like(x), *(torch.zeros_like(d).requires_grad_() for d in delta_samples))
            for _ in self.passes[1:]]
        steps = torch.cuda.make_graphed_callables(tuple(self.passes), tuple(samples), allow_unused_input=True)
        self.captures += 1
        return list(steps)
