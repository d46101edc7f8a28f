"""Deterministic kernels on request (`--deterministic`), and whether a run had them.

On the GPU, bf16 Kimi-Linear is not reproducible run to run by default: measured on the 48B-A3B architecture,
two greedy HF `generate` runs of one prompt diverged at new token 25 after unrelated allocations. With
`torch.use_deterministic_algorithms(True)` and `CUBLAS_WORKSPACE_CONFIG=:4096:8` it reproduced itself, and the
after-surgery wrapper was token-identical to it. So exactness (after_surgery == baseline) can only be judged
between deterministic GPU results; on a CPU every kernel rkl uses is deterministic anyway.

The flag is best-effort (`warn_only=True`): an op without a deterministic implementation warns instead of stopping
an evaluation. cuBLAS reads its workspace setting when it first starts, so this must run before any CUDA work.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=True)


def deterministic_record() -> dict:
    """What run.json and eval results record about determinism."""
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
