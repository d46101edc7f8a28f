"""The "rkl" lm-eval model on a tiny checkpoint of each kind, offline, through lm-eval itself (simple_evaluate and its
CLI): after_surgery generates exactly what the baseline does, log-likelihoods are the base model's (phase A, whose
base is frozen, scores exactly the baseline's), the numbers agree with lm-eval's own hf model and with a hand
computation, and rkl's tasks/ ship the data their generator writes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rkl.data.prompts import encode_prompt
from rkl.errors import UserError

lm_eval = pytest.importorskip("lm_eval")  # the eval extra; `make install` installs it with the test extra
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import rkl.lm_eval_model  # noqa: E402,F401  (registers "rkl")
from rkl.eval.harness_tasks import ARITHMETIC_DATA, arithmetic_rows, tasks_dir  # noqa: E402
from rkl.paths import project_root  # noqa: E402

TASKS = ["rkl_arithmetic", "rkl_arithmetic_ll", "rkl_arithmetic_rolling"]
LIMIT = 6


@pytest.fixture(scope="module")
def harness(tiny_stages, monkeypatch_module):
    """lm-eval results (with samples) of the three rkl tasks for baseline, after_surgery, phase_a and, on the
    baseline folder, lm-eval's own hf model."""
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.chdir(project_root())  # the tasks' data_files are relative to the project root
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)  # rkl's tasks only (indexing
    # lm-eval's own thousands of task YAMLs takes 13 s here)

    def run(model: str, args: str) -> dict:
        return simple_evaluate(model=model, model_args=args, tasks=TASKS, task_manager=manager, batch_size=4,
                               limit=LIMIT, log_samples=True, device="cpu", bootstrap_iters=0)

    out = {stage: run("rkl", f"checkpoint={tiny_stages / stage}") for stage in ("baseline", "after_surgery", "phase_a")}
    # lm-eval's reference implementation: the saved tokenizer adds the <eos> separator itself (its post-processor);
    # the empty-context / rolling prefix is set to <eos> too
    out["hf"] = run("hf", f"pretrained={tiny_stages / 'baseline'},dtype=float32,prefix_token_id=2")
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def responses(result: dict, task: str) -> list:
    return [(s["doc_id"], s["resps"]) for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_after_surgery_generates_exactly_what_the_baseline_does(harness):
    base, surg = harness["baseline"], harness["after_surgery"]
    assert len(responses(base, "rkl_arithmetic")) == LIMIT
    assert responses(surg, "rkl_arithmetic") == responses(base, "rkl_arithmetic")
    assert surg["results"]["rkl_arithmetic"]["exact_match,none"] == base["results"]["rkl_arithmetic"]["exact_match,none"]
    assert harness["phase_a"]["results"]["rkl_arithmetic"]["sample_len"] == LIMIT  # phase A generates through its sidecar


def test_log_likelihoods_are_the_base_models_for_every_stage(harness):
    base = harness["baseline"]
    for stage in ("after_surgery", "phase_a"):  # phase A trains the sidecar only: its base is the baseline's
        for task in ("rkl_arithmetic_ll", "rkl_arithmetic_rolling"):
            assert responses(harness[stage], task) == responses(base, task), (stage, task)


def test_rkl_agrees_with_lm_evals_hf_model_on_the_baseline(harness):
    """Same batching, prompt convention and scoring as lm-eval's HF model (whose rolling windows would score the
    separator twice: there the saved tokenizer adds it and lm-eval adds its prefix token)."""
    rkl, hf = harness["baseline"], harness["hf"]
    assert responses(rkl, "rkl_arithmetic") == responses(hf, "rkl_arithmetic")
    for (i, a), (j, b) in zip(responses(rkl, "rkl_arithmetic_ll"), responses(hf, "rkl_arithmetic_ll")):
        assert i == j and a[0][0][1] == b[0][0][1] and math.isclose(a[0][0][0], b[0][0][0], rel_tol=1e-5, abs_tol=1e-5)


def test_log_likelihoods_match_a_hand_computation(harness, tiny_stages):
    from rkl.model.surgery import load_model_with_config

    wrapper, tok, _ = load_model_with_config(tiny_stages / "baseline")
    rows = arithmetic_rows()

    def logprob(ids: list[int], start: int) -> float:  # sum of log p(ids[t] | ids[:t]) for t >= start
        with torch.no_grad():
            logp = torch.log_softmax(wrapper.base(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))

    for doc_id, resp in responses(harness["baseline"], "rkl_arithmetic_ll"):
        prompt = encode_prompt(tok, rows[doc_id]["prompt"])
        whole = encode_prompt(tok, rows[doc_id]["prompt"] + rows[doc_id]["answer"])
        assert math.isclose(resp[0][0][0], logprob(whole, len(prompt)), abs_tol=1e-4)
    for doc_id, resp in responses(harness["baseline"], "rkl_arithmetic_rolling"):
        ids = encode_prompt(tok, rows[doc_id]["prompt"] + rows[doc_id]["answer"])
        assert math.isclose(resp[0][0], logprob(ids, 1), abs_tol=1e-4)  # <eos> is the context, never scored


def test_the_shipped_arithmetic_data_is_what_the_generator_writes():
    shipped = (tasks_dir() / ARITHMETIC_DATA).read_text().splitlines()
    assert [json.loads(line) for line in shipped] == arithmetic_rows()


def test_model_args_reach_the_config_and_bad_ones_are_named(tiny_stages):
    from rkl.lm_eval_model import RklLM

    lm = RklLM.create_from_arg_string(f"checkpoint={tiny_stages / 'phase_a'},chunk_width=3,max_inner_steps=1,"
                                      "commit_threshold=0.7", {"batch_size": "2", "device": "cpu"})
    cfg = lm.wrapper.config
    assert (cfg.chunk_width, cfg.max_inner_steps, cfg.commit_threshold, lm.batch_size) == (3, 1, 0.7, 2)
    assert lm.prefix_token_id == lm.eot_token_id == 2 and lm.max_length == 8192
    with pytest.raises(UserError, match="unknown rkl model_args chunk_wdth"):
        RklLM.create_from_arg_string(f"checkpoint={tiny_stages / 'phase_a'},chunk_wdth=3")
    with pytest.raises(UserError, match="integer batch_size"):
        RklLM.create_from_arg_string(f"checkpoint={tiny_stages / 'phase_a'}", {"batch_size": "auto"})


def test_lm_evals_command_line_finds_the_rkl_model_and_tasks(tiny_stages, monkeypatch, capsys):
    """`rkl-lm-eval` is lm-eval's CLI with the model registered and tasks/ included."""
    from rkl import lm_eval_cli

    monkeypatch.chdir(project_root())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # lm-eval's CLI indexes its own task YAMLs as well as --include_path (13 s here); this test needs only rkl's
    index = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: index(self, *a, **{**k, "include_defaults": False}))
    monkeypatch.setattr("sys.argv", ["rkl-lm-eval", "--model", "rkl", "--model_args",
                                     f"checkpoint={tiny_stages / 'after_surgery'}", "--tasks", "rkl_arithmetic",
                                     "--limit", "2", "--batch_size", "2"])
    lm_eval_cli.main()
    out = capsys.readouterr().out
    assert "rkl_arithmetic" in out and "exact_match" in out
