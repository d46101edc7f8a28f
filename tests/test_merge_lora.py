"""`rkl eval --merge-lora` on the tiny preset: every LoRA adapter (the routed experts' too) folded into its base
weight gives the unmerged model's logits, runs no side product afterwards, and is recorded in the result and shown by
`rkl compare`."""

from __future__ import annotations

import io
import json
import shutil

import torch
from typer.testing import CliRunner

from rkl.cli import app
from rkl.eval.compare import compare
from rkl.eval.runner import run_eval
from rkl.model.adapters import inject_lora, save_base_changes
from rkl.model.base import load_base
from rkl.model.expert_lora import lora_factors
from rkl.model.merge import adapted_layers, lora_record, merge_lora
from rkl.model.surgery import load_model_with_config

SHAPE = {"rank": 4, "alpha": 8, "layers": "top_third", "experts": True}
IDS = torch.arange(3, 27).reshape(2, 12)


def logits(base: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return base(IDS, use_cache=False).logits


def adapt(base: torch.nn.Module) -> torch.nn.Module:
    """LoRA of phase B's shape with a random B (peft starts B at zero, where merging would change nothing)."""
    inject_lora(base, SHAPE)
    torch.manual_seed(0)
    for name, p in base.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return base


def phase_b_folder(tiny_stages, tmp_path):
    """A phase-B-like checkpoint: tiny_stages' phase_a (sidecar) plus random LoRA saved as phase B saves it."""
    folder = tmp_path / "phase_b"
    shutil.copytree(tiny_stages / "phase_a", folder)
    wrapper, _, config = load_model_with_config(folder)
    save_base_changes(adapt(wrapper.base), config.replace(unfreeze_every=0), folder)
    return folder


def expert_wrappers(base: torch.nn.Module) -> list:
    """peft's ParamWrappers of the routed experts: down_proj's (outer) and gate_up_proj's (inner) per MoE layer."""
    return [m for m in adapted_layers(base) if hasattr(m, "parameter_name")]


def test_merged_lora_gives_the_unmerged_logits_and_runs_no_side_product():
    unadapted = logits(load_base("tiny")[0])
    base = adapt(load_base("tiny")[0])
    wrappers = expert_wrappers(base)
    assert {w.parameter_name for w in wrappers} == {"gate_up_proj", "down_proj"} and len(wrappers) == 4
    unmerged = logits(base)
    assert (unmerged - unadapted).abs().max() > 1e-3  # the adapters act, so a merge that drops one shows
    fused_before = {id(w): w.get_param().detach().clone() for w in wrappers}
    # the LoRA Linears call their lora_A / lora_B modules while unmerged; the experts' factors are read, never called
    calls = []
    for layer in adapted_layers(base):
        for module in (*layer.lora_A.values(), *layer.lora_B.values()):
            module.register_forward_hook(lambda *_: calls.append(1))
    logits(base)
    assert calls
    calls.clear()

    assert merge_lora(base) == len(adapted_layers(base)) == 18
    assert lora_record(base) == {"lora_layers": 18, "lora_merged": True}
    for w in wrappers:  # W += s B A per expert: the fused [experts, out, in] parameter itself changed by that
        a_t, b_t, scaling = lora_factors(w)
        delta = (scaling * a_t @ b_t).transpose(-2, -1)
        torch.testing.assert_close(w.get_param() - fused_before[id(w)], delta, rtol=1e-5, atol=1e-6)
        assert delta.abs().max() > 1e-3, w.parameter_name
    merged = logits(base)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)  # float32 base: only rounding differs
    assert not calls
    # no side product, the experts' included: adapters gone NaN leave the merged model's logits as they were
    for name, p in base.named_parameters():
        if "lora_" in name:
            p.data.fill_(float("nan"))
    assert torch.equal(logits(base), merged)


def test_a_nan_expert_adapter_poisons_the_unmerged_model():
    """What the NaN check above relies on: an unmerged expert adapter does reach the logits."""
    base = adapt(load_base("tiny")[0])
    for w in expert_wrappers(base):
        w.lora_A["default"].weight.data.fill_(float("nan"))
    assert not torch.isfinite(logits(base)).all()


def test_merging_a_base_without_lora_changes_nothing():
    base = load_base("tiny")[0]
    before = logits(base)
    assert merge_lora(base) == 0
    assert lora_record(base) == {"lora_layers": 0, "lora_merged": False}
    assert torch.equal(logits(base), before)


def test_rkl_eval_records_the_merge_and_compare_shows_it(tiny_stages, tmp_path):
    """A phase-B-like folder (phase_a's sidecar plus random LoRA) scored unmerged and merged: two results, each saying
    how it ran its LoRA, and compare naming both and warning that they differ in kind."""
    folder = phase_b_folder(tiny_stages, tmp_path)
    results = {}
    for merge in (False, True):
        path = run_eval("phase_b", model=str(folder), limit=4, merge_lora=merge, results_dir=tmp_path / "results",
                        log_dir=tmp_path / "logs", show_progress=False)
        results[json.loads(path.read_text())["stage"]] = json.loads(path.read_text())
    assert set(results) == {"phase_b", "phase_b_merged"}  # a merged run never replaces the stage's own result
    assert results["phase_b"]["eval"]["lora_merged"] is False and results["phase_b_merged"]["eval"]["lora_merged"]
    assert results["phase_b"]["eval"]["lora_layers"] == results["phase_b_merged"]["eval"]["lora_layers"] == 18
    ppl = {s: r["metrics"]["perplexity"] for s, r in results.items()}
    assert abs(ppl["phase_b_merged"] - ppl["phase_b"]) <= 1e-4 * ppl["phase_b"]
    baseline = run_eval("baseline", model=str(tiny_stages / "baseline"), limit=4, merge_lora=True,
                        results_dir=tmp_path / "results", log_dir=tmp_path / "logs", show_progress=False)
    results["baseline"] = json.loads(baseline.read_text())  # no LoRA: nothing merged, the stage's own name
    assert results["baseline"]["stage"] == "baseline" and results["baseline"]["eval"]["lora_merged"] is False

    report = compare(results, tmp_path / "compare", None, draw_plots=False)
    row = {r[0]: r[1:] for r in report.table_rows}
    assert report.stages == ["baseline", "phase_b", "phase_b_merged"]
    assert row["lora"] == ["none", "unmerged", "merged"]
    assert any("LoRA merged" in w and "phase_b_merged" in w and "unmerged" in w for w in report.warnings)
    assert "| LoRA |" in report.markdown
    alike = compare({s: results[s] for s in ("baseline", "phase_b_merged")}, tmp_path / "c2", None, draw_plots=False)
    assert not any("LoRA" in w for w in alike.warnings)


def test_rkl_eval_tasks_merge_lora_saves_its_own_record(tiny_stages, tmp_path, monkeypatch):
    """--tasks with --merge-lora scores the merged model and saves lm_eval/<stage>_merged.json, which says so; the
    unmerged run's record stays."""
    from rkl.paths import project_root

    folder = phase_b_folder(tiny_stages, tmp_path)
    (tmp_path / "configs").symlink_to(project_root() / "configs")
    monkeypatch.chdir(tmp_path)
    saved = {}
    for flag, name in (("--no-merge-lora", "phase_b"), ("--merge-lora", "phase_b_merged")):
        result = CliRunner().invoke(app, ["eval", "--stage", "phase_b", "--model", str(folder), "--tasks",
                                          "arithmetic", "--limit", "2", flag])
        assert result.exit_code == 0, result.output
        saved[name] = json.loads((tmp_path / "eval_results" / "lm_eval" / f"{name}.json").read_text())
    assert saved["phase_b"]["lora_merged"] is False and saved["phase_b_merged"]["lora_merged"] is True
    assert saved["phase_b"]["lora_layers"] == saved["phase_b_merged"]["lora_layers"] == 18


def test_rkl_generate_merges_too_and_writes_the_unmerged_text(tiny_stages, tmp_path, monkeypatch):
    """`rkl generate --merge-lora` generates from the merged model and, in float32, writes the same greedy text."""
    from rich.console import Console

    from rkl.generate_command import run_generate
    from rkl.model import merge

    records = []  # the LoRA state of each model generate loaded, taken where the eval path merges
    monkeypatch.setattr(merge, "merge_lora", lambda base: records.append(merge_lora(base)) or records[-1])

    folder = phase_b_folder(tiny_stages, tmp_path)
    texts = {merge: run_generate("phase_b", ["1 + 2 ="], Console(file=io.StringIO()), model=str(folder),
                                 max_new_tokens=12, merge_lora=merge) for merge in (False, True)}
    assert records == [18]  # merged once: in the --merge-lora run, all 18 adapted layers
    assert texts[True] == texts[False]
