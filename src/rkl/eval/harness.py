"""`rkl eval --stage S --tasks NAME,...`: lm-eval tasks scored on a stage through the "rkl" lm-eval model.

The stage is resolved and loaded as `rkl eval` loads it (rkl.stage_model), then handed to lm-eval's
`simple_evaluate` with rkl's tasks/ included. Short names: arithmetic, arithmetic_ll, arithmetic_rolling (rkl's
arithmetic tasks), arc (rkl_arc_agi_1), humaneval (rkl_humaneval); any other name is looked up among lm-eval's own
tasks (whose data may need the network). HumanEval executes model-written code and runs only with
`allow_code_execution` (`--allow-code-execution`), which is lm-eval's `confirm_run_unsafe_code`.

The result goes to eval_results/lm_eval/<stage>.json: lm-eval's results, sample counts, task versions and configs,
plus the stage, model, resolved config and limit. `rkl compare` reads only eval_results/*.json, never these.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from rkl.errors import UserError
from rkl.paths import eval_results_dir

TASK_ALIASES = {"arithmetic": "rkl_arithmetic", "arithmetic_ll": "rkl_arithmetic_ll",
                "arithmetic_rolling": "rkl_arithmetic_rolling", "arc": "rkl_arc_agi_1", "humaneval": "rkl_humaneval"}
TASK_BATCH = 25  # requests per generation / forward: rkl eval's generation batch (rkl.eval.tasks.GEN_BATCH)


def resolve_tasks(tasks: str) -> list[str]:
    names = [TASK_ALIASES.get(t.strip(), t.strip()) for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks needs at least one task name (e.g. --tasks arithmetic,arc,humaneval)")
    return list(dict.fromkeys(names))


def task_manager(names: list[str]):
    """A TaskManager that knows every task asked for: rkl's tasks/ alone when that suffices (indexing lm-eval's own
    thousands of task YAMLs takes seconds), else with lm-eval's tasks too; UserError naming an unknown task."""
    from lm_eval.tasks import TaskManager

    from rkl.eval.harness_tasks import tasks_dir

    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(tasks_dir()))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        ours = ", ".join(sorted(TASK_ALIASES))
        raise UserError(f"unknown task {', '.join(unknown)}: rkl's tasks are {ours} (or their lm-eval names "
                        f"{', '.join(TASK_ALIASES.values())}), or any lm-eval task (`lm-eval ls tasks`)")
    return manager


def run_tasks(stage: str, tasks: str, model: str | None = None, config_path: str | Path | None = None,
              overrides: list[str] | None = None, chunk_width: int | None = None, limit: int | None = None,
              dtype: str | None = None, allow_code_execution: bool = False, results_dir: Path | None = None,
              batch_size: int = TASK_BATCH, merge_lora: bool = False) -> tuple[Path, dict[str, Any]]:
    """Score a stage on lm-eval tasks; returns (path of the saved result, lm-eval's results dict). merge_lora: with
    its LoRA folded into the base weights (rkl.model.merge), saved as <stage>_merged.json, as `rkl eval` saves it."""
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        raise UserError('--tasks runs lm-evaluation-harness, which is not installed: pip install -e ".[eval]"') from None
    from rkl.eval.harness_tasks import tasks_dir
    from rkl.eval.runner import cpu_threads
    from rkl.lm_eval_model import RklLM
    from rkl.model.merge import lora_record, merged_name
    from rkl.stage_model import load_stage_model

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    names = resolve_tasks(tasks)
    if TASK_ALIASES["humaneval"] in names and not allow_code_execution:
        raise UserError("humaneval executes the model's code to score it; pass --allow-code-execution to run it "
                        "(README, \"ARC and HumanEval\")")
    manager = task_manager(names)
    t0 = time.perf_counter()
    loaded = load_stage_model(stage, model=model, config_path=config_path, overrides=overrides,
                              chunk_width=chunk_width, dtype=dtype, merge_lora=merge_lora)
    lm = RklLM(loaded=loaded, batch_size=batch_size)
    # rkl's json tasks name their data relative to the folder that holds tasks/
    with contextlib.chdir(tasks_dir().parent), cpu_threads(loaded.wrapper):
        try:
            results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      confirm_run_unsafe_code=allow_code_execution)
        except ValueError as e:
            if "unsafe" in str(e):
                raise UserError(f"{', '.join(names)}: a task executes model-written code; pass "
                                "--allow-code-execution to run it (README, \"ARC and HumanEval\")") from None
            raise
    lora = lora_record(loaded.wrapper.base)
    record = {"stage": stage, "model": str(loaded.model), "config_source": loaded.config_source,
              "config": loaded.config.to_dict(), "tasks": names, "limit": limit, "batch_size": batch_size,
              "allow_code_execution": allow_code_execution, "command": " ".join(sys.argv),
              "seconds": time.perf_counter() - t0, **lora,
              **{k: results[k] for k in ("results", "n-samples", "versions", "configs") if k in results}}
    out_dir = Path(results_dir) if results_dir is not None else eval_results_dir() / "lm_eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{merged_name(stage, lora)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path, results


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own Markdown table of a results dict (what its CLI prints)."""
    from lm_eval.utils import make_table

    return make_table(results)
