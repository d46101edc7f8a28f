"""Reading weight files with one clear error: a truncated or corrupt safetensors file names itself and the fix.

safetensors checks a file's header against its size when it opens it, so `check_safetensors` finds a truncated
file without reading the tensors (milliseconds, also for the 48B checkpoint's shards).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from rkl.errors import UserError


def _unreadable(path: Path, e: Exception) -> UserError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"{path} is unreadable ({reason}): the file is truncated or corrupt; re-run the stage that "
                     "wrote it (or restore the file)")


def check_safetensors(path: str | Path) -> None:
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def check_weight_files(folder: str | Path) -> None:
    """Every *.safetensors file of a folder opens (header and size agree)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path)


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None
