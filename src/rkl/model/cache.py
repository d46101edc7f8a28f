"""Snapshot and restore of Kimi-Linear's hybrid DynamicCache, and a cache that backpropagates.

The cache of `KimiLinearForCausalLM` is a `DynamicCache` with one layer object per decoder layer:

- KDA layers: `LinearAttentionLayer` holding `conv_states` / `recurrent_states` (dicts of tensors; the recurrent
  state is fp32 [B, heads, dk, dv]) and per-state flags (`has_previous_state`, ...). transformers updates these
  tensors IN PLACE (`copy_`, to keep static addresses for CUDA graphs), so a snapshot must CLONE them;
- MLA layers: `DynamicLayer` holding the compressed latent as `keys` / `values`. `update` builds new tensors with
  `torch.cat`, never mutating the old ones, so a snapshot keeps REFERENCES and restoring re-binds them: no copy of
  the O(prefix) part at all.

`snapshot_cache` therefore costs O(layers x state size), independent of the prefix length, and `restore_cache`
builds a fresh cache object (re-cloning the KDA tensors, so one snapshot can be restored any number of times).
`crop()` is not an alternative: it does not roll the KDA state back.

Gradients: `LinearAttentionLayer.update_recurrent_state` / `update_conv_state` copy into the stored tensor in place.
When a chunk with grad starts from a cached prefix, the stored tensor is an input of the chunk's graph (KDA reads
the initial state) and the in-place copy breaks backward ("modified by an inplace operation").
`restore_cache(snapshot, grad_friendly=True)` (and `new_cache(config, grad_friendly=True)`) give KDA layers a
subclass that ASSIGNS new tensors instead; values are identical, only storage differs. Refinement passes use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin, LinearAttentionLayer

_STATE_DICTS = ("conv_states", "recurrent_states")


class _AssigningLinearAttentionMixin:
    """KDA cache layer whose updates assign new tensors (autograd-safe) instead of copying in place."""

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None,
                          **kwargs: Any) -> torch.Tensor:
        if not self.is_conv_states_initialized[state_idx]:
            self.lazy_initialization(conv_states=conv_states, state_idx=state_idx, conv_kernel_size=conv_kernel_size)
        if not self.has_previous_state[state_idx]:
            full = conv_states
            self.has_previous_state[state_idx] = True
            if not self.record_past and full.shape[-1] < self.conv_kernel_size[state_idx]:
                full = torch.nn.functional.pad(full, (self.conv_kernel_size[state_idx] - full.shape[-1], 0), value=0)
        else:
            full = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
        if not self.record_past:
            # A clone, not a view: the one-token decode path later copies into the stored conv state in place, which
            # must not touch `full` (saved by the conv for backward). Contiguous, as transformers allocates it: a
            # plain clone of this slice of a transpose keeps a transposed layout, and fla's one-token kernel
            # (rkl.model.kernels) reads and writes the window as a contiguous [B, D, W].
            self.conv_states[state_idx] = full[..., -self.conv_kernel_size[state_idx]:].clone(
                memory_format=torch.contiguous_format)
        else:
            self.conv_states[state_idx] = full
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        self.recurrent_states[state_idx] = recurrent_states
        self.is_recurrent_states_initialized[state_idx] = True
        return recurrent_states


_ASSIGNING_CLASSES: dict[type, type] = {}


def _assigning_class(cls: type) -> type:
    if issubclass(cls, _AssigningLinearAttentionMixin):
        return cls
    if cls not in _ASSIGNING_CLASSES:
        _ASSIGNING_CLASSES[cls] = type(f"Assigning{cls.__name__}", (_AssigningLinearAttentionMixin, cls), {})
    return _ASSIGNING_CLASSES[cls]


def _plain_class(cls: type) -> type:
    if issubclass(cls, _AssigningLinearAttentionMixin):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, _AssigningLinearAttentionMixin))
    return cls


@dataclass
class CacheSnapshot:
    """A restorable copy of a cache: per layer, its class and its attributes (KDA tensors cloned, MLA by reference)."""

    cache_cls: type
    cache_attrs: dict[str, Any]
    layers: list[tuple[type, dict[str, Any]]]
    seq_length: int | None  # tokens in the MLA cache; None for a cache without attention layers
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int | None:
        for _, attrs in self.layers:
            for name in ("keys", *_STATE_DICTS):
                v = attrs.get(name)
                if torch.is_tensor(v) and v.dim() > 0:
                    return v.shape[0]
                if isinstance(v, dict):
                    for t in v.values():
                        if torch.is_tensor(t):
                            return t.shape[0]
        return None


def _copy_layer_attrs(layer: Any, clone: bool) -> dict[str, Any]:
    attrs = {}
    is_linear = isinstance(layer, LinearAttentionCacheLayerMixin)
    for name, value in vars(layer).items():
        if is_linear and name in _STATE_DICTS:
            attrs[name] = {k: (t.clone() if clone and torch.is_tensor(t) else t) for k, t in value.items()}
        elif isinstance(value, dict):
            attrs[name] = dict(value)  # flags: has_previous_state, is_*_initialized, conv_kernel_size
        else:
            attrs[name] = value  # MLA keys/values (never mutated in place), ints, dtypes, devices
    return attrs


def snapshot_cache(cache: Cache) -> CacheSnapshot:
    """Snapshot `cache` at this moment; the cache itself is left untouched and may keep being used."""
    layers = [(type(layer), _copy_layer_attrs(layer, clone=True)) for layer in cache.layers]
    attrs = {k: v for k, v in vars(cache).items() if k != "layers"}
    try:
        seq_length = cache.get_seq_length()
    except ValueError:  # only linear-attention layers: nothing records a length
        seq_length = None
    return CacheSnapshot(cache_cls=type(cache), cache_attrs=attrs, layers=layers, seq_length=seq_length)


def restore_cache(snapshot: CacheSnapshot, grad_friendly: bool = False) -> Cache:
    """A new cache equal to the snapshot (tensors equal; KDA tensors fresh clones, MLA tensors shared).

    grad_friendly=True gives KDA layers the assigning update (see the module docstring): use it for any forward
    that must backpropagate through a chunk that starts from this snapshot.
    """
    cache = object.__new__(snapshot.cache_cls)
    vars(cache).update(copy.copy(snapshot.cache_attrs))
    layers = []
    for cls, attrs in snapshot.layers:
        is_linear = issubclass(cls, LinearAttentionCacheLayerMixin)
        if is_linear:
            cls = _assigning_class(cls) if grad_friendly else _plain_class(cls)
        layer = object.__new__(cls)
        vars(layer).update({
            name: ({k: (t.clone() if torch.is_tensor(t) else t) for k, t in value.items()}
                   if is_linear and name in _STATE_DICTS
                   else dict(value) if isinstance(value, dict) else value)
            for name, value in attrs.items()
        })
        layers.append(layer)
    cache.layers = layers
    return cache


def snapshot_rows(snapshot: CacheSnapshot, rows: slice) -> CacheSnapshot:
    """The snapshot of `rows` of a batch: every per-row tensor sliced along its batch dimension (views; a row's
    values do not depend on the other rows'). Lets several batches walked as one share that walk's prefix pass."""
    def cut(value: Any) -> Any:
        if torch.is_tensor(value) and value.dim() > 0:
            return value[rows]
        if isinstance(value, dict):
            return {k: cut(t) if torch.is_tensor(t) else t for k, t in value.items()}
        return value

    layers = [(cls, {name: cut(value) if name in ("keys", "values", *_STATE_DICTS) else value
                     for name, value in attrs.items()}) for cls, attrs in snapshot.layers]
    return CacheSnapshot(cache_cls=snapshot.cache_cls, cache_attrs=dict(snapshot.cache_attrs), layers=layers,
                         seq_length=snapshot.seq_length, meta=dict(snapshot.meta))


def new_cache(config: Any, grad_friendly: bool = False) -> DynamicCache:
    """An empty cache for `config` (what generate builds), optionally with the assigning KDA layers."""
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    if grad_friendly:
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, LinearAttentionLayer):
                swapped = object.__new__(_assigning_class(type(layer)))
                vars(swapped).update(vars(layer))
                cache.layers[i] = swapped
    return cache


def cache_tensors(cache: Cache) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a cache holds, named, in a stable order (for tests and equality checks)."""
    out = []
    for i, layer in enumerate(cache.layers):
        for name, value in sorted(vars(layer).items()):
            if torch.is_tensor(value):
                out.append((f"{i}.{name}", value))
            elif isinstance(value, dict):
                for k, t in sorted(value.items(), key=lambda kv: str(kv[0])):
                    if torch.is_tensor(t):
                        out.append((f"{i}.{name}.{k}", t))
    return out


def caches_equal(a: Cache, b: Cache) -> bool:
    """True when both caches hold the same tensors (names, shapes, dtypes, values bitwise) and flags."""
    ta, tb = cache_tensors(a), cache_tensors(b)
    if [n for n, _ in ta] != [n for n, _ in tb]:
        return False
    for (_, x), (_, y) in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            return False
    for la, lb in zip(a.layers, b.layers):
        if getattr(la, "has_previous_state", None) != getattr(lb, "has_previous_state", None):
            return False
    return True
