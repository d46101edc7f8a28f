"""The shared training loop on the tiny preset: loss falls, checkpoints are complete, resume is exact."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rkl import RecursiveConfig
from rkl.train.phases import PhaseRun, run_phase

FAST = dict(data="shakespeare+arithmetic", max_chars_per_source=40_000, arithmetic_digits=2, seq_len=32,
            batch_size=8, eval_batches=2, lr=3e-3, warmup_steps=2, log_interval=1, seed=3)


def pretrain(tmp_path, name, steps, **kw):
    config = RecursiveConfig(recursive_enabled=False, steps=steps, eval_interval=steps, save_interval=3, **FAST)
    run = PhaseRun(phase="pretrain", config=config, model="tiny", out=tmp_path / name, log_dir=tmp_path / "logs" / name,
                   show_progress=False, **kw)
    return run_phase(run)


def test_pretrain_lowers_validation_loss_and_writes_a_complete_checkpoint(tmp_path):
    result = pretrain(tmp_path, "base", steps=24)
    first, last = result.val_history[0], result.val_history[-1]
    assert first["step"] == 0 and last["step"] == 24
    assert last["loss"] < first["loss"] - 1.0, (first, last)
    out = tmp_path / "base"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recursive_config.json", "run.json",
                 "training_state.pt"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "run.json").read_text())
    assert meta["step"] == 24 and meta["seed"] == 3 and meta["versions"]["transformers"] == "5.23.0"
    assert meta["data"]["split_hash"]
    assert RecursiveConfig.from_file(out / "recursive_config.json").steps == 24
    assert not list(tmp_path.glob("base.tmp-*")) and not list(tmp_path.glob("base.old-*"))
    assert list((tmp_path / "logs" / "base").glob("events.out.tfevents.*"))


def test_resume_after_interrupt_matches_the_uninterrupted_run(tmp_path):
    pretrain(tmp_path, "straight", steps=6)
    interrupted = pretrain(tmp_path, "resumed", steps=6, stop_at=4)  # 4 is not a save_interval (3) step
    assert interrupted.steps_done == 4 and interrupted.interrupted
    resumed = pretrain(tmp_path, "resumed", steps=6, resume=True)
    assert resumed.steps_done == 6
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path):
    from rkl.errors import UserError

    with pytest.raises(UserError, match="no resumable checkpoint"):
        pretrain(tmp_path, "nothing", steps=2, resume=True)


def test_resume_with_a_changed_config_is_refused(tmp_path):
    from rkl.errors import UserError

    pretrain(tmp_path, "run", steps=4, stop_at=2)
    config = RecursiveConfig(recursive_enabled=False, steps=4, eval_interval=4, save_interval=3,
                             **{**FAST, "lr": 1e-3})
    run = PhaseRun(phase="pretrain", config=config, model="tiny", out=tmp_path / "run",
                   log_dir=tmp_path / "logs" / "run", show_progress=False, resume=True)
    with pytest.raises(UserError, match="lr"):
        run_phase(run)


def _poison(monkeypatch, bad_steps):
    """The LM loss times NaN at the given steps (a fault injected into the real task)."""
    from rkl.train.lm import LMTask

    real = LMTask.loss

    def loss(self, step, micro):
        value, scalars = real(self, step, micro)
        return (value * float("nan"), scalars) if step in bad_steps else (value, scalars)

    monkeypatch.setattr(LMTask, "loss", loss)


def test_a_nan_step_is_skipped_and_nothing_nan_is_saved(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, {1, 2})
    result = pretrain(tmp_path, "nan", steps=4)
    assert result.steps_done == 4
    assert "step 2: the loss or gradient is not finite; step skipped" in capsys.readouterr().err
    weights = load_file(str(tmp_path / "nan" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert result.history[-1]["skipped_steps"] == 2


def test_nan_steps_in_a_row_abort_with_a_user_error_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    from rkl.errors import UserError
    from rkl.train.loop import MAX_BAD_STEPS

    _poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(UserError, match=f"not finite for {MAX_BAD_STEPS} steps in a row"):
        pretrain(tmp_path, "nan", steps=3 + MAX_BAD_STEPS + 2)
    state = torch.load(tmp_path / "nan" / "training_state.pt", weights_only=False)
    assert state["step"] in (3, 6)  # checkpoints keep coming while steps are skipped, and none holds a NaN
    for slot in state["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in slot.values() if torch.is_tensor(v))
    weights = load_file(str(tmp_path / "nan" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_progress_lines_when_the_output_is_not_a_terminal(tmp_path, capsys):
    from rkl.train.phases import PhaseRun, run_phase

    config = RecursiveConfig(recursive_enabled=False, steps=3, eval_interval=3, save_interval=3, **FAST)
    run_phase(PhaseRun(phase="pretrain", config=config, model="tiny", out=tmp_path / "p",
                       log_dir=tmp_path / "logs" / "p", show_progress=True))
    err = capsys.readouterr().err
    assert "step 1/3" in err and "step 3/3" in err and "tok/s" in err and "eta" in err


def test_the_training_state_is_memory_mapped_not_read_whole(tmp_path):
    """Each process of a sharded run loads the saved training state and keeps only its shards of the AdamW moments:
    mapped, the state costs a process no memory until read (read whole it cost every process all of it: 4 x 88.7 GB
    of moments at 48B on 4 GPUs)."""
    from rkl.train.checkpoint import TRAINING_STATE, has_training_state, load_training_state

    assert not has_training_state(tmp_path) and load_training_state(tmp_path) is None
    moments = torch.arange(64 * 2**20, dtype=torch.float32)  # 256 MiB
    torch.save({"optimizer": {"state": {0: {"exp_avg": moments}}}, "step": 3}, tmp_path / TRAINING_STATE)

    def resident_gib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    before = resident_gib()
    state = load_training_state(tmp_path)
    grown = resident_gib() - before
    assert has_training_state(tmp_path) and state["step"] == 3
    assert grown < 0.0625, f"loading the state made the process {grown:.3f} GiB larger"
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"][-5:], moments[-5:])
