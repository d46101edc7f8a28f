"""Data-parallel training on 2 CPU processes (gloo, launched with torchrun): the same curve as one process at the same
global batch, only the main process writes, and resume is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rkl.paths import project_root

SETTINGS = ["--set", "data=shakespeare+arithmetic", "--set", "max_chars_per_source=30000", "--set",
            "arithmetic_digits=2", "--set", "seq_len=24", "--set", "eval_batches=1", "--set", "eval_interval=4",
            "--set", "log_interval=1", "--set", "warmup_steps=0", "--set", "save_interval=4"]


def rkl(cwd: Path, args: list[str], processes: int = 1) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "rkl"]
                if processes > 1 else [sys.executable, "-m", "rkl"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(project_root() / "src")}
    done = subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def curve(cwd: Path, run: str, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(cwd / "logs" / f"ck__{run}"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    (root / "configs").symlink_to(project_root() / "configs")
    pretrain = ["train", "--phase", "pretrain", "--model", "tiny", "--steps", "4", *SETTINGS]
    rkl(root, pretrain + ["--out", "ck/one", "--batch-size", "4"])
    rkl(root, pretrain + ["--out", "ck/two", "--batch-size", "2"], processes=2)
    rkl(root, pretrain + ["--out", "ck/two_resumed", "--batch-size", "2", "--stop-at", "2"], processes=2)
    rkl(root, pretrain + ["--out", "ck/two_resumed", "--batch-size", "2", "--resume"], processes=2)
    return root


def test_two_processes_follow_one_process_at_the_same_global_batch(runs):
    for tag in ("train/loss/total", "val/loss"):
        one, two = curve(runs, "one", tag), curve(runs, "two", tag)
        assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 2, tag
        for (_, a), (_, b) in zip(one, two):
            assert abs(a - b) < 1e-4, (tag, one, two)
    a, b = load_file(str(runs / "ck/one/model.safetensors")), load_file(str(runs / "ck/two/model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert json.loads((runs / "ck/two/run.json").read_text())["world_size"] == 2
    assert json.loads((runs / "ck/one/run.json").read_text())["world_size"] == 1
    # one writer: a single TensorBoard event stream per run (the first rank's)
    assert len(list((runs / "logs" / "ck__two").glob("events.out.tfevents.*"))) == 1
    tokens = curve(runs, "two", "train/tokens_per_s")
    assert tokens and all(v > 0 for _, v in tokens)


def test_two_processes_resume_exactly(runs):
    a = load_file(str(runs / "ck/two/model.safetensors"))
    b = load_file(str(runs / "ck/two_resumed/model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
