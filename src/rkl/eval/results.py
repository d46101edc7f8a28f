"""Result files: one JSON per stage under eval_results/, written atomically, never silently overwritten.

Schema of `eval_results/<stage>.json` (a plain dict, so the eval runner, compare and a researcher's notebook
all read it without rkl):

    {
      "schema_version": 1,
      "stage": "phase_a",
      "created": "2026-11-03T14:02:11+00:00",          # ISO 8601, UTC
      "metrics": {"perplexity": 12.3, "arith_exact": 0.41, ...},     # name -> float
      "counts": {"tokens": 81920, "arith": 200, "restore": 4096, "draft": 512},  # items behind each metric
      "stderr": {"perplexity": 0.05},                   # optional: SEs the runner estimated itself
      "config": {...},                                  # resolved RecursiveConfig
      "checkpoint": {"path": "checkpoints/phase_a", "sha256": "..."},
      "data": {"split_hash": "...", ...},               # same hash <=> scored on the same held-out items
      "versions": {"python": "3.11.7", "torch": "2.13.0", ...},
      "device": "cpu" | "NVIDIA H100 80GB HBM3",
      "timings": {"total_s": 81.2, ...},
      "committed_lengths": [16, 16, 9, ...],            # B' of every committed chunk
      "greedy_sha256": "...",                           # sha256_json of greedy generations on fixed prompts
      "history": [ {older result, same schema, without "history"}, ... ]   # oldest first
    }

"counts" maps a metric name, or its group ("tokens" for token_accuracy, "arith" for arith_exact, "restore"
for restore_acc_*, "draft" for draft_acc), to the number of independent items it was measured on; compare
uses it for binomial standard errors and says "significance unknown" when it is missing.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rkl.errors import UserError
from rkl.runmeta import package_versions

SCHEMA_VERSION = 1
# JSON files in a results directory that are not stage results (compare output, if ever written as JSON)
COMPARE_ARTEFACTS = frozenset({"compare.json"})
# accuracy metric -> the "counts" group holding its number of independent items (a "counts" entry named
# after the metric itself takes precedence)
COUNT_GROUPS = {
    "token_accuracy": "tokens",
    "restore_acc_k": "restore",
    "restore_acc_1": "restore",
    "draft_acc": "draft",
    "arith_exact": "arith",
}


def sample_count(result: dict[str, Any], metric: str) -> int | None:
    """How many independent items `metric` was measured on, from result["counts"]; None when unknown."""
    counts = result.get("counts") or {}
    n = counts.get(metric, counts.get(COUNT_GROUPS.get(metric, metric)))
    return int(n) if isinstance(n, (int, float)) and n > 0 else None


def _json_default(obj: Any) -> Any:
    """Paths become strings and 0-d tensors / numpy scalars become Python numbers; anything else is an error
    rather than a silently stringified object nobody can compare later."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable in a result file")


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of obj (sorted keys, no whitespace): equal data <=> equal hash, so a list
    of greedy generations or of held-out example ids can be checked for identity across stages."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes; for a directory (a save_pretrained checkpoint), sha256 over the sorted
    "relative/path\\0<file sha256>\\n" lines of every file in it, so renaming or changing any shard changes it.
    Reads in 1 MiB blocks: a 96 GB checkpoint takes minutes, which is the price of knowing what was scored."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def now_iso() -> str:
    """Current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def make_result(stage: str, metrics: dict[str, float], **fields: Any) -> dict[str, Any]:
    """A result dict with the schema's keys filled: created, versions and empty defaults, then `fields`
    (config, checkpoint, data, device, timings, counts, committed_lengths, greedy_sha256, ...) on top."""
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "created": now_iso(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "counts": {},
        "config": {},
        "checkpoint": {"path": None, "sha256": None},
        "data": {"split_hash": None},
        "versions": package_versions(),
        "device": "unknown",
        "timings": {},
        "committed_lengths": [],
        "greedy_sha256": None,
        "history": [],
    }
    result.update(fields)
    return result


def _check_stage_name(stage: Any) -> str:
    if not isinstance(stage, str) or not stage or "/" in stage or "\\" in stage or stage.startswith("."):
        raise UserError(f"result has a bad stage name {stage!r}: use a plain name such as 'phase_a'")
    if f"{stage}.json" in COMPARE_ARTEFACTS:
        raise UserError(f"stage name {stage!r} is reserved for compare output: choose another name")
    return stage


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`: a crash leaves either the
    old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_result(result: dict[str, Any], results_dir: Path) -> Path:
    """Write results_dir/<stage>.json atomically and return its path.

    If a result for the stage exists, it (without its own history) is appended to the new result's history,
    after the history it already carried, so re-evaluating never loses a number. The on-disk file is the
    source of truth for history: a "history" in `result` is kept only when no file exists yet. An existing
    file that is not valid JSON is renamed to <stage>.json.unreadable-<time> rather than overwritten.
    """
    stage = _check_stage_name(result.get("stage"))
    if not isinstance(result.get("metrics"), dict):
        raise UserError(f"result for {stage!r} has no 'metrics' dict: the eval runner must fill it")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stage}.json"
    new = copy.deepcopy(result)
    new.setdefault("created", now_iso())
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            path.rename(path.with_name(f"{path.name}.unreadable-{now_iso().replace(':', '')}"))
        else:
            history = list(old.pop("history", []) or [])
            new["history"] = history + [old]
    new.setdefault("history", [])
    _write_atomic(path, json.dumps(new, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read eval result {path}: {exc}; re-run `rkl eval` for that stage") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        return None
    return data


def load_results(results_dir: Path, stages: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Results keyed by stage (the file stem). stages=None: every *.json in results_dir that is a result
    (compare artefacts and JSON without a "metrics" dict are skipped). A named stage without a result file is
    a user error that says which `rkl eval` to run."""
    results_dir = Path(results_dir)
    if stages is None:
        paths = [p for p in sorted(results_dir.glob("*.json")) if p.name not in COMPARE_ARTEFACTS]
        loaded = {p.stem: _read(p) for p in paths}
        return {k: v for k, v in loaded.items() if v is not None}
    out: dict[str, dict[str, Any]] = {}
    for stage in stages:
        path = results_dir / f"{stage}.json"
        if not path.is_file():
            have = sorted(p.stem for p in results_dir.glob("*.json")
                          if p.name not in COMPARE_ARTEFACTS and _read(p) is not None)
            known = f"evaluated so far: {', '.join(have)}" if have else "nothing is evaluated yet"
            close = difflib.get_close_matches(stage, have, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"no eval result for stage {stage!r} in {results_dir} ({known}); {hint}evaluate it with "
                            f"`rkl eval --stage {stage}` (a stage without a convention needs --model)")
        data = _read(path)
        if data is None:
            raise UserError(f"{path} is not an eval result (no 'metrics'): re-run `rkl eval --stage {stage}`")
        out[stage] = data
    return out
