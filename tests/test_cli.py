"""The command line: help for every command, and one clear line with exit code 2 for bad input."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rkl import RecursiveConfig
from rkl.config import config_reference_markdown
from rkl.cli import app
from rkl.paths import project_root

runner = CliRunner()
CHECKOUT = project_root()


@pytest.fixture(autouse=True)
def project_in_tmp(tmp_path, monkeypatch):
    """The project root is tmp_path (with the real configs/): training runs here write their TensorBoard logs and
    plots under tmp_path, never into the checkout's logs/, where `rkl compare` would plot them as a user's runs."""
    (tmp_path / "configs").symlink_to(CHECKOUT / "configs")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("command", ["train", "surgery", "eval", "compare", "config"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_train_help_explains_every_option():
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--phase", "--recursive-config", "--model", "--out", "--steps", "--batch-size", "--resume", "--set"):
        assert flag in out, flag


def user_error(args, tmp_path):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any(line.startswith("error:") for line in lines), result.output
    return result.output


def test_unknown_set_key_names_the_key(tmp_path):
    out = user_error(["train", "--phase", "a", "--set", "chunk_wdth=4", "--out", str(tmp_path / "x")], tmp_path)
    assert "chunk_wdth" in out
    assert not (tmp_path / "x").exists()


def test_wrong_type_and_out_of_range_in_a_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"chunk_width": "wide"}')
    assert "chunk_width" in user_error(["train", "--phase", "a", "-c", str(bad)], tmp_path)
    bad.write_text('{"corruption_rate": 3}')
    assert "corruption_rate" in user_error(["surgery", "-c", str(bad)], tmp_path)


def test_unknown_phase_and_missing_start_checkpoint(tmp_path):
    assert "unknown phase" in user_error(["train", "--phase", "z"], tmp_path)
    out = user_error(["train", "--phase", "vanilla", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                     tmp_path)
    assert "none" in out


def test_real_process_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rkl", "config", "--stage", "phase_a", "--set", "seed=-1"],
                          capture_output=True, text=True, cwd=CHECKOUT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "seed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_readme_config_reference_is_the_code_s():
    """The README's table is `rkl config --markdown`: every field, its type, default, readers and meaning."""
    readme = (CHECKOUT / "README.md").read_text()
    table = runner.invoke(app, ["config", "--markdown"]).output
    assert table == config_reference_markdown() and table in readme
    for name in RecursiveConfig().to_dict():
        assert f"| `{name}` |" in table, name
    listing = runner.invoke(app, ["config"], env={"COLUMNS": "300"}).output
    assert "lr (float, default 0.003; read by train pretrain, vanilla):" in listing


# ------------------------------------------------------------------------------------------ nothing lost
TINY_RUN = ["train", "--phase", "pretrain", "--model", "tiny", "--batch-size", "2", "--set", "seq_len=16",
            "--set", "data=arithmetic", "--set", "max_chars_per_source=5000", "--set", "eval_batches=1",
            "--set", "arithmetic_digits=2"]


def test_a_checkpoint_is_never_replaced_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, TINY_RUN + ["--steps", "3", "--stop-at", "2", "--out", str(out)]).exit_code == 0
    before = (out / "training_state.pt").read_bytes()
    msg = user_error(TINY_RUN + ["--steps", "3", "--out", str(out)], tmp_path)
    assert "--resume" in msg and "--overwrite" in msg
    assert (out / "training_state.pt").read_bytes() == before  # untouched
    # --resume without --steps continues to the run's own length (3), not the stage file's
    result = runner.invoke(app, TINY_RUN + ["--resume", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "(step 3)" in result.output
    assert runner.invoke(app, TINY_RUN + ["--steps", "1", "--overwrite", "--out", str(out)]).exit_code == 0


def test_a_folder_being_written_is_locked(tmp_path):
    import os

    out = tmp_path / "run"
    (tmp_path / "run.lock").write_text(f"{os.getpid()}\n")  # a live holder: this test process
    msg = user_error(TINY_RUN + ["--steps", "1", "--out", str(out)], tmp_path)
    assert f"pid {os.getpid()}" in msg and not out.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run.lock").write_text(dead.stdout)  # the holder is gone (killed): the lock is taken over
    assert runner.invoke(app, TINY_RUN + ["--steps", "1", "--out", str(out)]).exit_code == 0
    assert not (tmp_path / "run.lock").exists()


def test_unknown_key_suggests_the_field_and_fp16_on_cpu_is_refused(tmp_path):
    out = user_error(["config", "--stage", "phase_b", "--set", "lora_rnak=16"], tmp_path)
    assert "did you mean lora_rank" in out
    out = user_error(TINY_RUN + ["--steps", "1", "--dtype", "float16", "--out", str(tmp_path / "x")], tmp_path)
    assert "float16 needs a GPU" in out and not (tmp_path / "x").exists()


def test_truncated_weight_files_are_one_line_errors_naming_the_file(tmp_path):
    base = tmp_path / "base"
    assert runner.invoke(app, TINY_RUN + ["--steps", "1", "--out", str(base)]).exit_code == 0
    good = tmp_path / "surg"
    assert runner.invoke(app, ["surgery", "--model", str(base), "--out", str(good)]).exit_code == 0
    sidecar = good / "sidecar.safetensors"
    sidecar.write_bytes(sidecar.read_bytes()[:-64])
    msg = user_error(["eval", "--stage", "s", "--model", str(good), "--limit", "1"], tmp_path)
    assert "sidecar.safetensors is unreadable" in msg and "re-run the stage" in msg
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    msg = user_error(["surgery", "--model", str(base), "--out", str(tmp_path / "again")], tmp_path)
    assert "model.safetensors is unreadable" in msg and not (tmp_path / "again").exists()


def test_compare_of_a_missing_stage_lists_what_is_evaluated(tmp_path, monkeypatch):
    from rkl.eval.results import make_result, save_result

    save_result(make_result("phase_a", {"perplexity": 10.0}), tmp_path / "eval_results")
    monkeypatch.setattr("rkl.eval.report.eval_results_dir", lambda: tmp_path / "eval_results", raising=False)
    msg = user_error(["compare", "baseline", "phase_z"], tmp_path)
    assert "evaluated so far: phase_a" in msg


def test_a_recursive_phase_from_a_preset_says_to_run_surgery(tmp_path):
    msg = user_error(["train", "--phase", "a", "--model", "tiny", "--out", str(tmp_path / "x")], tmp_path)
    assert "is a model preset" in msg and "rkl surgery --model tiny" in msg


def test_a_field_the_phase_does_not_read_is_refused(tmp_path):
    msg = user_error(["train", "--phase", "a", "--set", "lr=0.1", "--out", str(tmp_path / "x")], tmp_path)
    assert "lr is not used by phase a" in msg and "lr_refine" in msg
    msg = user_error(TINY_RUN + ["--set", "lambda_keep=2", "--out", str(tmp_path / "y")], tmp_path)
    assert "lambda_keep is not used by phase pretrain" in msg


def test_two_runs_with_the_same_folder_name_never_share_tensorboard_logs(tmp_path, monkeypatch):
    from rkl.paths import checkpoint_dir, logs_dir, run_log_dir

    assert run_log_dir(checkpoint_dir("phase_a")) == logs_dir() / "phase_a"  # what rkl compare reads
    a, b = run_log_dir(tmp_path / "x" / "phase_a"), run_log_dir(tmp_path / "y" / "phase_a")
    assert a != b and a.parent == b.parent == logs_dir() and a.name.endswith("x__phase_a")


def test_ctrl_c_before_the_first_step_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    from rkl.train.lm import LMTask

    def interrupted(self, step, micro):
        raise KeyboardInterrupt

    monkeypatch.setattr(LMTask, "loss", interrupted)
    result = runner.invoke(app, TINY_RUN + ["--steps", "2", "--out", str(tmp_path / "x")])
    assert result.exit_code == 130
    assert "nothing to resume" in result.output and not (tmp_path / "x" / "training_state.pt").exists()
