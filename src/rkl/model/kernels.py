"""Kernels for KDA: the reference's chunk size on CPUs, fla's short convolution on GPUs.

On machines without flash-linear-attention's Triton kernels (every CPU), transformers runs KDA through its
pure-PyTorch reference `chunk_kimi_delta_attention`, whose intra-chunk solve is a Python loop over `chunk_size` rows
(default 64) and which pads every multi-token forward to a multiple of it: an 8-token refinement pass costs as much
as a 64-token one. With chunk_size 16, measured on 2 CPU cores (tiny preset, forward+backward, B=16): 2.8x the
tokens/s at T=128 and an 8-token chunk pass after a cached prefix 8x faster; outputs agree to 4e-7 (fp32). The math
is the same for any chunk size.

On a GPU with fla, transformers takes fla's KDA kernels but looks for the KDA layer's short causal convolution in the
separate `causal-conv1d` package (CUDA-only, no wheel here), and without it runs `F.conv1d` (it warns so). fla ships
a Triton kernel for the same convolution with another layout ([B, T, D] instead of [B, D, T]; the decode cache is the
same [B, D, W] window, updated in place the same way): `set_short_convolution("fla")` plugs it in.

The MLA layers call PyTorch's SDPA, which on an H100/H200 picks cuDNN's attention first (the query/key head width,
192, is not the value's, 128, which rules out the flash kernel). cuDNN builds an execution graph per shape, on the
host, and a decode step's key length is new every step: profiled on one H200 (small preset, batch 64, prefix 1024),
`aten::_cudnn_attention_forward` took 59% of the host time, about 20 ms per call, while the whole step kept the GPU
busy for 10 ms. `set_cudnn_attention(False)` leaves SDPA its memory-efficient kernel instead.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any, Callable

import torch

REFERENCE_KDA_CHUNK = 16


def fla_kernels_available() -> bool:
    """transformers uses fla's kernels when `fla.ops.kda` imports, which needs triton (so: a GPU machine)."""
    return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None


def use_small_reference_kda_chunks(chunk_size: int = REFERENCE_KDA_CHUNK) -> bool:
    """Set the reference KDA's default chunk size (process-wide, so every path — generate's prefill, refinement
    passes, training — computes alike). Returns whether it applied (False when fla's kernels are in use)."""
    if fla_kernels_available():
        return False
    from transformers.models.kimi_linear import modeling_kimi_linear

    reference = inspect.unwrap(modeling_kimi_linear.chunk_kimi_delta_attention)
    names = list(inspect.signature(reference).parameters)
    defaults = list(reference.__defaults__)
    first_default = len(names) - len(defaults) - 1  # the trailing **kwargs has no default and is not counted
    index = names.index("chunk_size") - first_default
    defaults[index] = chunk_size
    reference.__defaults__ = tuple(defaults)
    return True


def fla_short_convolution(conv_btd: Callable, update_btd: Callable) -> tuple[Callable, Callable]:
    """transformers' `causal_conv1d_fn` / `causal_conv1d_update` ([B, D, T] in and out) on top of fla-style
    `causal_conv1d(x [B, T, D], weight [D, W], bias, activation=) -> (y, final_state)` and
    `causal_conv1d_update(x [B, 1, D], cache [B, D, W], weight=, bias=, activation=) -> (y, cache)`.

    The functions are arguments so the layout glue is tested on a CPU with PyTorch stand-ins (tests/test_kernels.py)."""

    def causal_conv1d_fn(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = None, **kwargs: Any) -> torch.Tensor:
        # transformers hands over a transpose of [B, T, D] (then .contiguous() is free) or, after a cached prefix,
        # the conv window concatenated with the new tokens in [B, D, T]
        x = hidden_states.transpose(1, 2).contiguous()
        y, _ = conv_btd(x, weight, bias, activation=activation)
        return y.transpose(1, 2)

    def causal_conv1d_update(hidden_states: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad)
        if needs_grad or not conv_state.is_contiguous():
            # fla's one-token update has no backward, and it writes the window as a contiguous [B, D, W]: such a
            # pass takes the reference (rkl's caches keep the window contiguous, so only training passes do)
            return _REFERENCE["causal_conv1d_update"](hidden_states, conv_state, weight, bias, activation)
        y, _ = update_btd(hidden_states.transpose(1, 2), conv_state, weight=weight, bias=bias, activation=activation)
        return y.transpose(1, 2)

    return causal_conv1d_fn, causal_conv1d_update


_REFERENCE: dict[str, Callable] = {}


def set_short_convolution(kind: str) -> str:
    """Process-wide: "fla" (fla's Triton kernel, when fla and triton import) or "reference" (transformers'
    F.conv1d). Returns the kind in use afterwards. Both kinds compute the same convolution up to rounding, so
    results compare (after_surgery vs baseline) only within one kind: rkl sets it once, when it loads a model."""
    from transformers.models.kimi_linear import modeling_kimi_linear as mkl

    names = ("causal_conv1d_fn", "causal_conv1d_update")
    if not _REFERENCE:
        _REFERENCE.update({name: getattr(mkl, name) for name in names})
    if kind == "reference" or not fla_kernels_available():
        functions = (_REFERENCE["causal_conv1d_fn"], _REFERENCE["causal_conv1d_update"])
        kind = "reference"
    elif kind == "fla":
        from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update
        functions = fla_short_convolution(causal_conv1d, causal_conv1d_update)
    else:
        raise ValueError(f"unknown short convolution '{kind}' (fla or reference)")
    for name, function in zip(names, functions):
        setattr(mkl, name, function)
    return kind


def short_convolution_in_use() -> str:
    from transformers.models.kimi_linear import modeling_kimi_linear as mkl

    return "reference" if not _REFERENCE or mkl.causal_conv1d_fn is _REFERENCE["causal_conv1d_fn"] else "fla"


def set_cudnn_attention(allowed: bool) -> bool:
    """Process-wide: whether SDPA may dispatch to cuDNN's attention (see the module docstring; rkl turns it off when
    it loads a model). The kernels round differently, so results compare only within one setting."""
    torch.backends.cuda.enable_cudnn_sdp(allowed)
    return torch.backends.cuda.cudnn_sdp_enabled()


def kernel_record() -> dict:
    """What run.json and eval results record about the kernels (results compare only within one choice)."""
    return {"kda_kernels": "fla" if fla_kernels_available() else "reference",
            "short_convolution": short_convolution_in_use(),
            "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled()}
