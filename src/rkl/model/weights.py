"""Weight files: reading them with one clear error (a truncated or corrupt safetensors file names itself and the
fix), and writing one a tensor at a time.

safetensors checks a file's header against its size when it opens it, so `check_safetensors` finds a truncated
file without reading the tensors (milliseconds, also for the 48B checkpoint's shards).
"""

from __future__ import annotations

import json
import struct
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


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


class SafetensorsStream:
    """A safetensors file written one tensor at a time, for tensors gathered one at a time (FSDP's unfrozen layers,
    44 GB in phase C at 48B, of which the writer then never holds more than one). The header needs every tensor's
    name, shape and dtype up front; `tensors` fixes the order `write` must follow (largest items first, as
    safetensors' own writer orders them, so every tensor stays aligned to its item size)."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.tensors = self.order(specs)
        self.specs, header, offset = specs, {}, 0
        for name in self.tensors:
            shape, dtype = specs[name]
            size = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.written = 0

    @staticmethod
    def order(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
        return sorted(specs, key=lambda n: (-specs[n][1].itemsize, n))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.tensors[self.written]
        shape, dtype = self.specs[expected]
        if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"expected {expected} {tuple(shape)} {dtype}, got {name} {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        self.file.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        self.written += 1

    def close(self) -> None:
        self.file.close()
        if self.written != len(self.tensors):
            raise ValueError(f"{self.written} of {len(self.tensors)} tensors written")
