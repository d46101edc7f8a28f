"""KDA on machines without flash-linear-attention's Triton kernels (every CPU).

transformers then runs KDA through its pure-PyTorch reference `chunk_kimi_delta_attention`, whose intra-chunk
solve is a Python loop over `chunk_size` rows (default 64) and which pads every multi-token forward to a
multiple of it: an 8-token refinement pass costs as much as a 64-token one. With chunk_size 16, measured on
2 CPU cores (tiny preset, forward+backward, B=16): 2.8x the tokens/s at T=128 and an 8-token chunk pass after
a cached prefix 8x faster; outputs agree to 4e-7 (fp32). The math is the same for any chunk size.
"""

from __future__ import annotations

import importlib.util
import inspect

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
