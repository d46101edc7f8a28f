"""Data-parallel training on 2 CPU processes (gloo, launched with torchrun): the same curve as one process at the same
global batch, only the main process writes, and resume is exact. With the base sharded by FSDP2, phase A trains
exactly what data parallel trains (phase C: tests/test_fsdp_phases.py)."""

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


def rkl(cwd: Path, args: list[str], processes: int = 1, accelerate_config: Path | None = None) -> None:
    if accelerate_config is not None:  # what a researcher types: accelerate launch --config_file ... -m rkl
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                    "-m", "rkl"]
    elif processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "rkl"]
    else:
        launcher = [sys.executable, "-m", "rkl"]
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


def test_two_processes_follow_one_process_at_the_same_global_batch_and_resume_exactly(runs):
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
    # and a 2-process run stopped and resumed ends bitwise equal (one test with the above: pytest-xdist would build
    # the module's runs again for a second test on the other worker)
    a = load_file(str(runs / "ck/two/model.safetensors"))
    b = load_file(str(runs / "ck/two_resumed/model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def launched_with_fsdp(monkeypatch):
    """This process as `accelerate launch` with fsdp2.yaml leaves it (for refusals, which come before any sharding)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")


@pytest.fixture(scope="module")
def phase_a_runs(runs, cpu_accelerate_config):
    """Phase A on 2 processes from the pretrain above, data parallel and with the base sharded by FSDP2. (Resume is
    the data-parallel one: the training state FSDP leaves is the sidecar's alone.)"""
    root = runs
    rkl(root, ["surgery", "--model", "ck/one", "--out", "ck/surgery"])
    phase_a = ["train", "--phase", "a", "--model", "ck/surgery", "--steps", "3", "--batch-size", "2", *SETTINGS,
               "--set", "eval_interval=3", "--set", "save_interval=3"]
    rkl(root, phase_a + ["--out", "ck/ddp"], processes=2)
    rkl(root, phase_a + ["--out", "ck/fsdp"], accelerate_config=cpu_accelerate_config("fsdp2"))
    rkl(root, [*phase_a, "--out", "ck/a_one", "--batch-size", "4"])  # the same global batch on one process
    return root


def test_fsdp_phase_a_shards_the_base_and_trains_what_data_parallel_trains(phase_a_runs):
    root = phase_a_runs
    meta = json.loads((root / "ck/fsdp/run.json").read_text())
    assert "fsdp" not in json.loads((root / "ck/ddp/run.json").read_text())
    shards = meta["fsdp"]
    assert shards["sharded_layers"] == 4 and meta["world_size"] == 2
    # each process holds half of every decoder layer; embeddings, final norm and LM head stay whole
    layers = shards["base_parameters"] - shards["base_parameters_here"]
    assert 0.3 * shards["base_parameters"] < 2 * layers < shards["base_parameters"]
    # all-gathered weights are the weights: the sidecar ends bitwise equal to the data-parallel run's
    ddp, fsdp, start = (load_file(str(root / f"ck/{run}/sidecar.safetensors")) for run in ("ddp", "fsdp", "surgery"))
    assert ddp.keys() == fsdp.keys() and all(torch.equal(ddp[k], fsdp[k]) for k in ddp)
    assert all(not torch.equal(fsdp[k], start[k]) for k in fsdp)  # and both trained every sidecar tensor
    for tag in ("train/loss/total", "val/loss"):
        assert curve(root, "ddp", tag) == curve(root, "fsdp", tag), tag
    # and data parallel trains what one process trains at the same global batch: phase A's token-level means are
    # over the global batch, whose slices hold different numbers of loss and keep positions (one test with the
    # above: a second consumer of phase_a_runs would rebuild it on the other pytest-xdist worker)
    for tag in ("train/loss/total", "train/loss/final", "train/loss/masked", "train/loss/halt", "train/loss/ponder",
                "train/loss/keep", "train/acc_k", "train/n_loss_positions", "val/loss"):
        one, two = curve(root, "a_one", tag), curve(root, "ddp", tag)
        assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 2, tag
        assert all(abs(a - b) < 1e-5 * max(1.0, abs(a)) for (_, a), (_, b) in zip(one, two)), (tag, one, two)
    one, two = (load_file(str(root / f"ck/{run}/sidecar.safetensors")) for run in ("a_one", "ddp"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


@pytest.mark.parametrize("phase", ["pretrain", "vanilla"])
def test_fsdp_is_refused_where_the_base_itself_trains(phase, tmp_path, launched_with_fsdp):
    from typer.testing import CliRunner

    from rkl.cli import app

    result = CliRunner().invoke(app, ["train", "--phase", phase, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "configs/accelerate/ddp.yaml" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
