"""Checkpoint folders: written atomically, with config and run metadata beside the weights.

A training checkpoint folder holds whatever the task saves (a `save_pretrained` model + tokenizer, or the
sidecar's safetensors), `recursive_config.json`, `run.json` (metadata) and `training_state.pt` (optimizer,
scheduler, RNG states, step; with sharded trained tensors, their optimizer state in `training_state.part-*.pt`
beside it) so `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rkl.config import RecursiveConfig
from rkl.errors import UserError

TRAINING_STATE = "training_state.pt"
COMPLETE = "COMPLETE"  # the last file a training checkpoint gets: a folder without it is half-written
_FAULT_STEP: list[int] = [0]  # the step being saved, for fault injection


def fault_point(name: str, step: int | None = None) -> None:
    """Test-only fault injection: RKL_FAULT=<name>:<step> kills this process with SIGKILL at that point (the kill
    tests use it to die inside a checkpoint save, between its renames, or after an optimizer step)."""
    want = os.environ.get("RKL_FAULT")
    if want and want == f"{name}:{step if step is not None else _FAULT_STEP[0]}":
        os.kill(os.getpid(), signal.SIGKILL)


def recover_checkpoint(final: Path) -> None:
    """Repair what a kill inside `atomic_dir` can leave: if `final` is missing, the newest complete sibling
    (`final.tmp-*` with COMPLETE, else the moved-aside `final.old-*`) becomes `final`; leftovers are removed.
    A half-written folder is never picked up."""
    final = Path(final)
    tmps = sorted(final.parent.glob(f"{final.name}.tmp-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    olds = sorted(final.parent.glob(f"{final.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not final.exists():
        whole = [p for p in tmps if (p / COMPLETE).is_file()] + [p for p in olds if (p / COMPLETE).is_file()]
        if whole:
            whole[0].rename(final)
    for p in tmps + olds:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on error it is removed.

    The old folder is moved aside before the new one is renamed in and only deleted afterwards, so at every
    instant one complete checkpoint exists on disk (final, or final.old-* if the process dies in between)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("save")
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    fault_point("swap")
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def checkpoint_folder(out_dir: Path, main: bool) -> Iterator[Path | None]:
    """atomic_dir(out_dir) on the main process; None on the others, which only take part in the gathers of a
    sharded save."""
    if not main:
        yield None
        return
    with atomic_dir(out_dir) as tmp:
        yield tmp


def write_checkpoint_files(folder: Path, config: RecursiveConfig, meta: dict, training_state: dict | None) -> None:
    """Everything of a checkpoint beside the weights (written before), COMPLETE last."""
    config.save(folder / "recursive_config.json")
    (folder / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if training_state is not None:
        torch.save(training_state, folder / TRAINING_STATE)
    (folder / COMPLETE).write_text(str(meta.get("step", "")) + "\n")  # written last: the folder is whole


# A sharded run's checkpoint gathers each sharded optimizer-state tensor whole on the main process. Held until one
# torch.save of the whole state, they were all of it at once: 88.7 GB of AdamW moments in phase C at 48B. So the
# main process writes them out as they come, in part files of up to this size (or one larger tensor: an MoE layer's
# fused gate_up_proj moment is 4.8 GB at 48B), and training_state.pt holds a StoredInPart where each was;
# load_training_state puts them back.
STATE_PART_BYTES = 1 << 30


@dataclass(frozen=True)
class StoredInPart:
    file: str  # beside training_state.pt
    key: str


class StateParts:
    """Part files `training_state.part-NNNN.pt` of a checkpoint folder, filled a tensor at a time."""

    def __init__(self, folder: Path, part_bytes: int = STATE_PART_BYTES) -> None:
        self.folder, self.part_bytes = Path(folder), part_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files = 0

    def store(self, key: str, tensor: torch.Tensor) -> StoredInPart:
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        if self.pending and sum(map(size, self.pending.values())) + size(tensor) > self.part_bytes:
            self.flush()  # first: the process then holds a part or one larger tensor, not both
        self.pending[key] = tensor
        return StoredInPart(self.name(), key)

    def name(self) -> str:
        return f"{TRAINING_STATE.removesuffix('.pt')}.part-{self.files:04d}.pt"

    def flush(self) -> None:
        if self.pending:
            torch.save(self.pending, self.folder / self.name())
            self.pending, self.files = {}, self.files + 1


def has_training_state(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / TRAINING_STATE).is_file()


def load_training_state(ckpt_dir: Path) -> dict | None:
    """The saved optimizer, scheduler, RNG state and step, or None. Memory-mapped: the tensors stay in the files (the
    page cache, which the processes of a host share) until read. Each process of a sharded run keeps only its own
    shards of the AdamW moments, so no process holds the whole state: 88.7 GB of moments in phase C at 48B, which
    every process would otherwise read whole (4 x 88.7 GB of host memory on 4 GPUs). Copy-on-write: nothing writes
    the files."""
    if not has_training_state(ckpt_dir):
        return None

    def load(name: str):
        return torch.load(Path(ckpt_dir) / name, map_location="cpu", weights_only=False, mmap=True)

    state, parts = load(TRAINING_STATE), {}
    for per_param in state.get("optimizer", {}).get("state", {}).values():
        for k, v in per_param.items():
            if isinstance(v, StoredInPart):
                if v.file not in parts:
                    parts[v.file] = load(v.file)
                per_param[k] = parts[v.file][v.key]
    return state


class RunLock:
    """`<out>.lock` beside an output folder while a run writes it: a second run into the same folder refuses, naming
    the holder's pid. A lock whose pid is gone (the run was killed) is taken over."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir).with_name(Path(out_dir).name + ".lock")

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _pid_in(self.path)
                if holder is not None and _alive(holder):
                    raise UserError(f"{self.path.with_suffix('')} is being written by another run (pid {holder}); "
                                    "wait for it to finish or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its run is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            return self
        raise UserError(f"could not lock {self.path}: remove it if no run is writing {self.path.with_suffix('')}")

    def __exit__(self, *exc) -> None:
        if _pid_in(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
