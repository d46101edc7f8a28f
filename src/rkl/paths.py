"""Convention over configuration: where stage configs, checkpoints, logs and results live.

A stage name resolves to `configs/<stage file>.json` and `checkpoints/<stage>/`. Paths are relative to the
project root: the current directory when it holds configs/, else the source tree rkl was installed from.
"""

from __future__ import annotations

from pathlib import Path

# stage -> config file stem under configs/
STAGE_CONFIGS = {
    "pretrain": "pretrain",
    "baseline": "baseline",
    "after_surgery": "after_surgery",
    "finetuned_vanilla": "finetuned_vanilla",
    "phase_a": "recursive_phase_a",
    "phase_b": "recursive_phase_b",
    "phase_c": "recursive_phase_c",
}
# `rkl train --phase X` -> stage whose checkpoint it writes
PHASE_STAGES = {"pretrain": "baseline", "vanilla": "finetuned_vanilla", "a": "phase_a", "b": "phase_b", "c": "phase_c"}
# the stage each phase starts from by convention
PHASE_INIT = {"pretrain": None, "vanilla": "pretrain", "a": "after_surgery", "b": "phase_a", "c": "phase_b"}


def project_root() -> Path:
    cwd = Path.cwd()
    if (cwd / "configs").is_dir():
        return cwd
    return Path(__file__).resolve().parents[2]


def configs_dir() -> Path:
    return project_root() / "configs"


def stage_config_path(stage: str) -> Path:
    return configs_dir() / f"{STAGE_CONFIGS.get(stage, stage)}.json"


def checkpoint_dir(stage: str) -> Path:
    return project_root() / "checkpoints" / stage


def logs_dir() -> Path:
    return project_root() / "logs"


def eval_results_dir() -> Path:
    return project_root() / "eval_results"


def run_log_dir(out: Path) -> Path:
    """TensorBoard folder of a training run writing `out`: logs/<stage> for the conventional checkpoints/<stage>
    (what `rkl compare` reads), else a name derived from the whole path, so `x/phase_a` and `y/phase_a` never share
    one (logs/x__phase_a, logs/y__phase_a)."""
    out = Path(out).resolve()
    if out.parent == (project_root() / "checkpoints").resolve():
        return logs_dir() / out.name
    try:
        rel = out.relative_to(project_root().resolve())
    except ValueError:
        rel = Path(*out.parts[1:])  # outside the project: the absolute path without its root
    return logs_dir() / "__".join(rel.parts)
