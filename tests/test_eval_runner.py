"""`rkl eval` and `rkl compare` end to end on a tiny checkpoint: after_surgery == baseline exactly, reproducible
numbers, history, provenance, TensorBoard, and one-line errors for a missing checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from rkl.cli import app
from rkl.config import RecursiveConfig
from rkl.data import load_documents, train_tokenizer
from rkl.errors import UserError
from rkl.eval import runner as eval_runner
from rkl.eval import refinement, tasks
from rkl.eval.report import run_compare
from rkl.eval.runner import TIMING_METRICS, run_eval
from rkl.model.base import load_base
from rkl.model.surgery import load_model_with_config, surgery
from rkl.paths import stage_config_path

LIMIT = 8  # examples per metric group: enough to exercise every path, fast on one CPU thread
MUST_MATCH = ("perplexity", "mean_nll", "token_accuracy", "restore_ce_1", "restore_acc_1", "draft_acc", "arith_exact")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny base checkpoint with a trained tokenizer, its surgery folder, and both stages evaluated (the
    baseline twice), results and logs under tmp."""
    root = tmp_path_factory.mktemp("eval")
    base, _ = load_base("tiny")
    docs = load_documents("mix", "train", arithmetic_digits=3, max_chars=50_000)
    tok = train_tokenizer(docs, base.config.vocab_size)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    surgery(root / "base", RecursiveConfig.from_file(stage_config_path("after_surgery")), root / "surg")

    def evaluate(stage: str, folder: str) -> dict:
        path = run_eval(stage, model=str(root / folder), limit=LIMIT, chunk_width=8, results_dir=root / "results",
                        log_dir=root / "logs" / "eval" / stage, show_progress=False)
        assert path == root / "results" / f"{stage}.json"
        return json.loads(path.read_text())

    first = evaluate("baseline", "base")
    surg = evaluate("after_surgery", "surg")
    second = evaluate("baseline", "base")
    return {"root": root, "baseline_first": first, "baseline": second, "after_surgery": surg}


def test_after_surgery_equals_baseline_exactly(env):
    base, surg = env["baseline"], env["after_surgery"]
    assert base["recursion"] is False and surg["recursion"] is True
    for m in MUST_MATCH:
        assert surg["metrics"][m] == base["metrics"][m], m  # exact, not approximate
    assert surg["greedy_sha256"] == base["greedy_sha256"] and len(surg["greedy_sha256"]) == 64
    # under the exact (inference) edit rule the neutral sidecar edits nothing
    m = surg["metrics"]
    assert m["draft_acc_refined"] == m["draft_acc"] and m["greedy_agree_plain"] == 1.0 and m["stability_at_k"] == 1.0
    assert 0.0 <= m["restore_stability_at_k"] <= 1.0 and m["restore_ce_k"] > 0
    assert m["avg_inner_steps"] == surg["config"]["max_inner_steps"] and m["commit_rate"] == 0.0
    assert surg["committed_lengths"] and all(1 <= b <= 8 for b in surg["committed_lengths"])
    assert m["mean_committed"] >= 1 and m["tpot_ms"] > 0 and m["tpot_uplift"] > 0
    # continuation: nothing changes at neutral init, so every chunk commits whole (8 positions, 32 new tokens)
    assert m["cont_greedy_agree_plain"] == 1.0 and m["cont_committed_fraction"] == 1.0 and m["cont_mean_committed"] == 8
    assert surg["counts"]["cont_prompts"] == LIMIT
    for key in ("perplexity", "restore_acc_1", "restore_acc_k", "draft_acc", "arith_exact"):
        assert key in surg["stderr"], key


def test_same_data_and_counts_for_every_stage(env):
    base, surg = env["baseline"], env["after_surgery"]
    assert base["data"]["split_hash"] == surg["data"]["split_hash"]
    assert base["data"]["eval_set_sha256"] == surg["data"]["eval_set_sha256"]
    assert base["data"]["test_stream_sha256"] == surg["data"]["test_stream_sha256"]
    for key in ("tokens", "restore", "draft", "arith"):
        assert base["counts"][key] == surg["counts"][key] > 0, key
    assert base["counts"]["arith"] == LIMIT and base["counts"]["tokens"] == LIMIT * tasks.PPL_LEN


def test_second_eval_is_identical_and_keeps_the_first_in_history(env):
    first, second = env["baseline_first"], env["baseline"]
    model_metrics = lambda r: {k: v for k, v in r["metrics"].items() if k not in TIMING_METRICS}  # noqa: E731
    assert model_metrics(first) == model_metrics(second)
    assert first["greedy_sha256"] == second["greedy_sha256"] and first["stderr"] == second["stderr"]
    assert len(second["history"]) == 1
    assert second["history"][0]["metrics"] == first["metrics"] and "history" not in second["history"][0]


def test_result_records_config_checkpoint_versions_and_timings(env):
    surg, base = env["after_surgery"], env["baseline"]
    assert surg["config"] == RecursiveConfig.from_file(env["root"] / "surg" / "recursive_config.json").to_dict()
    assert base["config"]["recursive_enabled"] is False and base["config"]["chunk_width"] == 8
    assert base["eval"]["config_source"] == str(stage_config_path("baseline"))
    for pkg in ("python", "torch", "transformers"):
        assert surg["versions"][pkg]
    assert len(surg["checkpoint"]["sha256"]) == 64
    assert surg["checkpoint"]["base"] == str((env["root"] / "base").resolve())
    assert base["checkpoint"]["sha256"] != surg["checkpoint"]["sha256"]
    assert {"load_s", "perplexity_s", "chunks_s", "arithmetic_s", "total_s"} <= set(surg["timings"])
    assert surg["device"] and surg["eval"]["limit"] == LIMIT


def test_tensorboard_gets_every_metric(env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(env["root"] / "logs" / "eval" / "after_surgery"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"evaluation/after_surgery/{m}" for m in env["after_surgery"]["metrics"]} <= tags


def test_compare_finds_no_exactness_warning(env):
    console = Console(record=True, width=200)
    report = run_compare(["baseline", "after_surgery"], console, results_dir=env["root"] / "results",
                         log_root=env["root"] / "logs", draw_plots=False)
    assert not [w for w in report.warnings if "after_surgery" in w], report.warnings
    assert not [w for w in report.warnings if "split" in w or "items" in w], report.warnings
    out = console.export_text()
    assert "rkl compare" in out and "compare.md" in out
    assert (env["root"] / "results" / "compare.md").is_file()


def test_compare_without_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="rkl eval"):
        run_compare(None, Console(record=True), results_dir=tmp_path, draw_plots=False)


def test_restoration_never_shows_the_sidecar_a_scored_token(env, monkeypatch):
    """Spy on refine_chunk: the restoration chunk is what the base samples at the scored positions, and it does not
    change when the targets at those positions do (so no scored target is in the chunk the sidecar reads)."""
    from rkl.data.chunks import TRUE, chunk_modes
    from rkl.data.packing import step_generator
    from rkl.model.drafts import build_chunk

    wrapper, tok, cfg = load_model_with_config(env["root"] / "surg")
    wrapper.eval()
    calls = []
    real = wrapper.refine_chunk

    def spy(chunk, snap, prev, editable, **kw):
        calls.append((chunk.clone(), editable.clone(), kw.get("commit_threshold")))
        return real(chunk, snap, prev, editable, **kw)

    monkeypatch.setattr(wrapper, "refine_chunk", spy)
    stream = torch.randint(3, 384, (2000,))
    with torch.no_grad():
        refinement.chunk_tasks(wrapper, stream, cfg, 2, 8, 4, lambda k: None)
    batch = next(refinement.eval_chunks(stream, 8, 2, 4))[1]
    restore = [c for c in calls if c[2] is None]
    assert len(restore) == 1
    chunk, editable, _ = restore[0]
    assert editable.all()  # every position editable
    g = step_generator(tasks.EVAL_SEED, 0, "eval-corrupt")
    modes, _ = chunk_modes(batch.chunk_ids.shape[0], 8, 0.0, 0.0, tasks.RESTORE_RATE, tasks.RESTORE_MASK, g)
    scored = modes != TRUE
    assert scored.any()
    other = torch.where(scored, (batch.chunk_ids + 5) % 380 + 3, batch.chunk_ids)
    snap, prev = wrapper.prepare_prefix(batch.prefix_ids)
    assert torch.equal(build_chunk(wrapper, snap, prev, other, modes, g), chunk)


def test_missing_checkpoint_is_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_runner, "checkpoint_dir", lambda stage: tmp_path / "checkpoints" / stage)
    with pytest.raises(UserError, match=r"run `rkl train --phase a` first"):
        run_eval("phase_a", results_dir=tmp_path / "r", log_dir=tmp_path / "l")
    with pytest.raises(UserError, match=r"run `rkl surgery` first"):
        run_eval("after_surgery", results_dir=tmp_path / "r", log_dir=tmp_path / "l")
    with pytest.raises(UserError, match="no sidecar"):  # a plain folder must not be scored with a fresh sidecar
        run_eval("phase_a", model=str(tmp_path), overrides=["recursive_enabled=true"], results_dir=tmp_path / "r")
    result = CliRunner().invoke(app, ["eval", "--stage", "phase_b"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "rkl train --phase b" in lines[0], result.output
    assert not (tmp_path / "r").exists()


def test_chunk_width_override_is_its_own_result_name(tmp_path):
    from rkl.eval.runner import resolve_eval_config

    path = tmp_path / "c.json"
    RecursiveConfig(chunk_width=8).save(path)
    config, _, changed = resolve_eval_config("phase_a", None, path, [], 16)
    assert config.chunk_width == 16 and changed
    config, _, changed = resolve_eval_config("phase_a", None, path, [], 8)
    assert config.chunk_width == 8 and not changed


def test_cli_eval_prints_its_headline_metrics_and_progress_lines(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(stage_config_path("baseline").parent)
    result = CliRunner().invoke(app, ["eval", "--stage", "b", "--model", str(env["root"] / "base"), "--limit", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "perplexity" in out and "arith_exact" in out and "saved" in out
    assert "eval chunks: 2 examples in" in out  # not a terminal: one line per finished group
    assert (tmp_path / "eval_results" / "b.json").is_file()
