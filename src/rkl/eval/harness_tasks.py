"""rkl's lm-eval tasks: where their YAMLs live (tasks/ at the project root) and the data the arithmetic tasks read.

tasks/rkl_arithmetic/arithmetic.jsonl is the first ARITHMETIC_PROBLEMS held-out problems of rkl's own arithmetic
test split at ARITHMETIC_DIGITS digits (the demo's), one {"prompt", "answer"} object a line; `write_arithmetic_data`
writes it and a test checks the shipped file is what it writes. ARC and HumanEval: rkl.eval.arc, rkl.eval.humaneval.
"""

from __future__ import annotations

import json
from pathlib import Path

from rkl.data.arithmetic import arithmetic_problems
from rkl.paths import project_root

ARITHMETIC_DIGITS = 2       # configs/baseline.json's arithmetic_digits: what the demo model is trained on
ARITHMETIC_PROBLEMS = 25
ARITHMETIC_DATA = Path("rkl_arithmetic") / "arithmetic.jsonl"


def tasks_dir() -> Path:
    """The folder of rkl's lm-eval task YAMLs (lm-eval's --include_path): the project root's tasks/, else the one
    of the source tree rkl was installed from (a project folder of one's own may hold configs/ only)."""
    own = project_root() / "tasks"
    return own if own.is_dir() else Path(__file__).resolve().parents[3] / "tasks"


def arithmetic_rows() -> list[dict[str, str]]:
    return [{"prompt": p.prompt, "answer": p.answer}
            for p in arithmetic_problems("test", ARITHMETIC_DIGITS, n=ARITHMETIC_PROBLEMS)]


def write_arithmetic_data(path: Path | None = None) -> Path:
    path = path or tasks_dir() / ARITHMETIC_DATA
    path.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows()))
    return path
