"""Result files with history, and compare's table, warnings, markdown and plots on synthetic results."""

from __future__ import annotations

import copy

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from rkl.errors import UserError
from rkl.eval.compare import compare, order_stages, print_report, render_table
from rkl.eval.plots import plot_training_curves
from rkl.eval.results import load_results, make_result, save_result, sha256_file, sha256_json

SPLIT = sha256_json({"split": "heldout", "ids": [1, 2, 3]})
GREEDY = sha256_json(["579", "1024"])


def _result(stage: str, **metrics: float) -> dict[str, Any]:
    base = {"perplexity": 12.5, "token_accuracy": 0.41, "arith_exact": 0.30}
    base.update(metrics)
    return make_result(stage, base, data={"split_hash": SPLIT}, greedy_sha256=GREEDY,
                       counts={"tokens": 8192, "arith": 200}, committed_lengths=[16, 16, 8, 12],
                       config={"chunk_width": 16}, device="cpu")


def _pipeline() -> dict[str, dict[str, Any]]:
    """baseline == after_surgery exactly; vanilla and phase_a differ by a clearly significant amount."""
    return {
        "phase_a": _result("phase_a", perplexity=10.1, arith_exact=0.80, token_accuracy=0.47, restore_acc_k=0.7, restore_acc_1=0.5,
                           avg_inner_steps=2.5, stability_at_k=0.9),
        "baseline": _result("baseline"),
        "after_surgery": _result("after_surgery"),
        "finetuned_vanilla": _result("finetuned_vanilla", perplexity=11.0, arith_exact=0.40, token_accuracy=0.44),
    }


def _warnings(results: dict[str, dict[str, Any]], tmp_path: Path) -> list[str]:
    return compare(results, tmp_path / "out", None, draw_plots=False).warnings


def test_save_result_keeps_old_result_in_history(tmp_path: Path) -> None:
    first = _result("phase_a", arith_exact=0.5)
    save_result(first, tmp_path)
    save_result(_result("phase_a", arith_exact=0.6), tmp_path)
    path = save_result(_result("phase_a", arith_exact=0.7), tmp_path)
    saved = json.loads(path.read_text())
    assert saved["metrics"]["arith_exact"] == 0.7
    assert [h["metrics"]["arith_exact"] for h in saved["history"]] == [0.5, 0.6]
    assert all("history" not in h for h in saved["history"])
    assert "history" not in first or first["history"] == []  # the caller's dict is not mutated
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_save_result_moves_unreadable_file_aside(tmp_path: Path) -> None:
    (tmp_path / "phase_a.json").write_text("{ truncated")
    path = save_result(_result("phase_a"), tmp_path)
    assert json.loads(path.read_text())["history"] == []
    assert [p.read_text() for p in tmp_path.glob("phase_a.json.unreadable-*")] == ["{ truncated"]


def test_load_results_skips_compare_artefacts_and_names_missing_stage(tmp_path: Path) -> None:
    for stage, r in _pipeline().items():
        save_result(r, tmp_path)
    (tmp_path / "compare.json").write_text("{}")
    (tmp_path / "notes.json").write_text('{"not": "a result"}')
    assert order_stages(load_results(tmp_path)) == ["baseline", "after_surgery", "finetuned_vanilla", "phase_a"]
    assert list(load_results(tmp_path, ["phase_a"])) == ["phase_a"]
    with pytest.raises(UserError, match="rkl eval --stage phase_c"):
        load_results(tmp_path, ["phase_c"])


def test_sha256_file_and_dir(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "a.bin").write_bytes(b"abc")
    digest = sha256_file(tmp_path / "ck")
    assert sha256_file(tmp_path / "ck" / "a.bin") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "ck" / "a.bin").write_bytes(b"abd")
    assert sha256_file(tmp_path / "ck") != digest
    assert sha256_json({"b": 1, "a": 2}) == sha256_json({"a": 2, "b": 1})


def test_identical_pipeline_has_no_exactness_or_split_warnings(tmp_path: Path) -> None:
    warnings = _warnings(_pipeline(), tmp_path)
    assert warnings == [], warnings


def test_warns_when_after_surgery_perplexity_drifts_by_1e_9(tmp_path: Path) -> None:
    results = _pipeline()
    results["after_surgery"]["metrics"]["perplexity"] += 1e-9
    warnings = _warnings(results, tmp_path)
    assert any(w.startswith("WARNING: after_surgery differs from baseline in perplexity") for w in warnings)
    report = compare(results, tmp_path / "out2", None, draw_plots=False)
    cell = report.table_rows[[r[0] for r in report.table_rows].index("Δ perplexity vs baseline")][2]
    assert cell not in ("=", "+0.00%"), cell  # the drift is visible in the table too


def test_warns_on_token_accuracy_and_greedy_hash(tmp_path: Path) -> None:
    results = _pipeline()
    results["after_surgery"]["greedy_sha256"] = sha256_json(["578", "1024"])
    results["after_surgery"]["metrics"]["token_accuracy"] = 0.41000001
    warnings = _warnings(results, tmp_path)
    assert any("greedy generations differ" in w for w in warnings)
    assert any("differs from baseline in token_accuracy" in w for w in warnings)
    assert all(w.startswith("WARNING:") for w in warnings)


def test_exactness_judged_only_between_reproducible_gpu_results(tmp_path: Path) -> None:
    results = _pipeline()
    for stage in ("baseline", "after_surgery"):
        results[stage]["device"] = "NVIDIA H200"
        results[stage]["eval"] = {"deterministic": True}
    results["after_surgery"]["metrics"]["perplexity"] += 1e-9
    assert any("differs from baseline in perplexity" in w for w in _warnings(results, tmp_path))
    results["baseline"]["eval"]["deterministic"] = False
    warnings = _warnings(results, tmp_path)
    assert any("not judged: baseline ran on a GPU without deterministic kernels" in w for w in warnings)
    assert not any("differs from baseline" in w for w in warnings)


def test_warns_when_split_hashes_differ(tmp_path: Path) -> None:
    results = _pipeline()
    results["phase_a"]["data"]["split_hash"] = sha256_json({"split": "train"})
    warnings = _warnings(results, tmp_path)
    assert any("DIFFERENT data splits" in w and "phase_a" in w for w in warnings)


def test_noise_warnings(tmp_path: Path) -> None:
    results = _pipeline()
    results["phase_a"]["metrics"]["arith_exact"] = 0.43  # +3pp over vanilla at n=200: 2 SE is ~9.8pp
    warnings = _warnings(results, tmp_path)
    assert any(w.startswith("WARNING: phase_a vs finetuned_vanilla: difference within noise") and "arith_exact" in w
               for w in warnings)
    del results["phase_a"]["counts"]["arith"]
    warnings = _warnings(results, tmp_path)
    assert any("significance unknown" in w and "arith_exact" in w for w in warnings)
    del results["finetuned_vanilla"]
    assert any("no finetuned_vanilla result" in w for w in _warnings(results, tmp_path))


def test_compare_writes_markdown_plots_and_table(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    logs = tmp_path / "logs"
    for run in ("phase_a", "finetuned_vanilla"):
        writer = SummaryWriter(str(logs / run))
        for step in range(30):
            writer.add_scalar("train/loss/total", 3.0 / (1 + step), step)
            writer.add_scalar("train/loss/final_ce", 2.0 / (1 + step), step)
            if step % 10 == 0:
                writer.add_scalar("val/loss", 2.5 / (1 + step), step)
        writer.close()
    out = tmp_path / "eval_results"
    report = compare(_pipeline(), out, logs)
    names = sorted(p.name for p in report.plots)
    assert names == ["committed_lengths.png", "curves_finetuned_vanilla.png", "curves_phase_a.png",
                     "curves_val_all.png", "metrics.png"]
    for p in report.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    md = (out / "compare.md").read_text()
    assert "| metric | baseline | after_surgery | finetuned_vanilla | phase_a |" in md
    assert "![metrics](metrics.png)" in md and "No warnings." in md
    assert report.stages == ["baseline", "after_surgery", "finetuned_vanilla", "phase_a"]
    row = {r[0]: r[1:] for r in report.table_rows}
    assert row["restore_acc_k"] == ["—", "—", "—", "70.00%"]
    assert row["Δ arith_exact vs vanilla"] == ["-10.00pp *", "-10.00pp *", "(ref)", "+40.00pp *"]
    assert row["Δ perplexity vs baseline"][:2] == ["(ref)", "="]
    assert row["Δ restore_acc_k − restore_acc_1"] == ["—", "—", "—", "+20.00pp ?"]  # no "restore" count given
    assert "Δ restore_acc_k vs baseline" not in row  # nothing to compare against: row dropped
    console = Console(record=True, width=140)
    console.print(render_table(report))
    print_report(report, console)
    assert "phase_a" in console.export_text()
    # no logs, or logs without loss tags: quietly no curve plots
    writer = SummaryWriter(str(tmp_path / "other" / "run"))
    writer.add_scalar("evaluation/baseline/perplexity", 12.5, 0)
    writer.close()
    assert plot_training_curves(tmp_path / "nologs", out) == []
    assert plot_training_curves(tmp_path / "other", out) == []
    assert plot_training_curves(None, out) == []


def test_exactness_judged_only_between_results_of_the_same_kernels(tmp_path: Path) -> None:
    results = _pipeline()
    kernels = {"kda_kernels": "fla", "short_convolution": "fla"}
    for stage in ("baseline", "after_surgery"):
        results[stage]["device"] = "NVIDIA H200"
        results[stage]["eval"] = {"deterministic": True, **kernels}
    results["after_surgery"]["metrics"]["perplexity"] += 1e-9
    assert any("differs from baseline in perplexity" in w for w in _warnings(results, tmp_path))
    # a GPU result from before rkl recorded cudnn_attention ran with it allowed (PyTorch's default)
    results["baseline"]["eval"]["cudnn_attention"] = False
    assert any("not judged: the two ran different kernels" in w for w in _warnings(results, tmp_path))
    on_cpu = copy.deepcopy(results)  # on a CPU the setting means nothing
    for stage in ("baseline", "after_surgery"):
        on_cpu[stage]["device"] = "cpu"
    assert any("differs from baseline in perplexity" in w for w in _warnings(on_cpu, tmp_path))
    results["baseline"]["eval"]["cudnn_attention"] = True
    assert any("differs from baseline in perplexity" in w for w in _warnings(results, tmp_path))
    for key, other in (("short_convolution", "reference"), ("cudnn_attention", True)):
        mismatched = copy.deepcopy(results)
        mismatched["after_surgery"]["eval"]["cudnn_attention"] = False
        mismatched["baseline"]["eval"][key] = other
        warnings = _warnings(mismatched, tmp_path)
        assert any("not judged: the two ran different kernels" in w and key in w for w in warnings), key
        assert not any("differs from baseline" in w for w in warnings)
