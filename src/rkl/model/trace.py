"""What happened inside each chunk of one generation, read from `generate_chunks(..., return_stats=True)`.

Per chunk: the draft the inner loop started from, the tokens each inner step changed (position, old, new), the
commit head's p_commit after each step, and the tokens the row committed. For one row (a batch of one): the stats of
a batch share one cache and one inner loop, so a trace of a single row of a batch would not be its own story.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepTrace:
    step: int                                   # 1-based inner step
    p_commit: float                             # the commit head's probability after this step
    changed: list[tuple[int, int, int]] = field(default_factory=list)  # (chunk position, old id, new id)


@dataclass
class ChunkTrace:
    index: int                                  # 1-based chunk number
    draft: list[int]                            # the seeded chunk the inner loop started from
    locked: int                                 # leading positions committed by an earlier chunk (not editable)
    steps: list[StepTrace]
    committed: list[int]                        # new tokens this chunk committed
    max_inner_steps: int                        # K: steps the loop may run

    @property
    def stopped_early(self) -> bool:
        """The commit head ended the loop before step K."""
        return len(self.steps) < self.max_inner_steps


def chunk_traces(stats: list[dict[str, Any]], max_inner_steps: int) -> list[ChunkTrace]:
    """One ChunkTrace per chunk of a single-row generation (stats as generate_chunks returns them)."""
    traces = []
    for i, s in enumerate(stats):
        if s["rows"] != 1 or len(s["draft"]) != 1:
            raise ValueError(f"chunk_traces reads a generation of one row; chunk {i + 1} has {s['rows']} rows")
        prev, steps = s["draft"][0], []
        for t, toks in enumerate(s["step_tokens"]):
            row = toks[0]
            steps.append(StepTrace(t + 1, float(s["p_commit"][t][0]),
                                   [(j, a, b) for j, (a, b) in enumerate(zip(prev, row)) if a != b]))
            prev = row
        locked, n = s["locked"][0], s["committed_lengths"][0]
        traces.append(ChunkTrace(i + 1, s["draft"][0], locked, steps, prev[locked:locked + n], max_inner_steps))
    return traces
