"""Kills survived: a training run SIGKILLed after a step, inside a checkpoint save and between the renames of a
save, then resumed with --resume each time, ends at the same step with bitwise the same weights and the same
TensorBoard curve as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rkl.paths import project_root

RUN = ["train", "--phase", "pretrain", "--model", "tiny", "--steps", "6", "--batch-size", "2", "--set", "seq_len=16",
       "--set", "data=arithmetic", "--set", "max_chars_per_source=5000", "--set", "arithmetic_digits=2",
       "--set", "eval_batches=1", "--set", "eval_interval=3", "--set", "save_interval=2", "--set", "log_interval=1"]


def rkl(cwd: Path, args: list[str], fault: str | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project_root() / "src")}
    env.pop("RKL_FAULT", None)
    if fault:
        env["RKL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "rkl"] + args, cwd=cwd, env=env, capture_output=True,
                          timeout=300).returncode


def test_killed_three_times_then_resumed_equals_the_uninterrupted_run(tmp_path):
    (tmp_path / "configs").symlink_to(project_root() / "configs")
    assert rkl(tmp_path, RUN + ["--out", "ck/straight"]) == 0
    out = ["--out", "ck/killed"]
    assert rkl(tmp_path, RUN + out, fault="step:3") == -signal.SIGKILL  # after step 3, before its checkpoint
    assert rkl(tmp_path, RUN + out + ["--resume"], fault="save:4") == -signal.SIGKILL  # half-written save
    assert list((tmp_path / "ck").glob("killed.tmp-*"))  # the half-written folder is there ...
    assert rkl(tmp_path, RUN + out + ["--resume"], fault="swap:6") == -signal.SIGKILL  # old moved aside, new not in
    assert not (tmp_path / "ck" / "killed").exists()
    assert rkl(tmp_path, RUN + out + ["--resume"]) == 0
    assert not list((tmp_path / "ck").glob("killed.*-*"))  # ... and never picked up; leftovers are gone
    a = load_file(str(tmp_path / "ck/straight/model.safetensors"))
    b = load_file(str(tmp_path / "ck/killed/model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = torch.load(tmp_path / "ck/killed/training_state.pt", weights_only=False)
    assert state["step"] == 6

    def curve(run: str) -> list[tuple[int, float]]:
        acc = EventAccumulator(str(tmp_path / "logs" / f"ck__{run}"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss/total")]

    straight, killed = curve("straight"), curve("killed")
    assert [s for s, _ in killed] == [s for s, _ in straight] == list(range(1, 7))  # no duplicate steps
    assert [v for _, v in killed] == [v for _, v in straight]
