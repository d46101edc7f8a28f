"""`rkl eval --stage S`: load a stage's model, score it on the fixed held-out sets, save and log the result.

Resolution. Model folder: `--model`, else checkpoints/<stage>. Config: `--recursive-config`, else the folder's
recursive_config.json when the folder holds a sidecar (the config the sidecar was built and trained with), else
the stage's file under configs/ (configs/baseline.json for a stage without one); then `--set` overrides, then
`--chunk-width`. Recursion is on iff the resolved config says so.

Held-out data, identical for every stage (so their data.split_hash match): the "test" split of the config's
data source (capped at max_chars_per_source per component), encoded with the model's tokenizer into one stream.
The metric groups and their exact definitions are in rkl.eval.tasks (perplexity, example-set sizes),
rkl.eval.refinement (restoration, draft quality) and rkl.eval.generation (arithmetic, generation stats, TPOT);
`--limit N` caps every group at N examples. Everything is seeded: the same stage evaluated twice gives the same
numbers, timings and peak memory aside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rkl.config import RecursiveConfig
from rkl.data.arithmetic import arithmetic_problems
from rkl.data.corpora import describe_source, load_documents
from rkl.data.packing import encode_documents
from rkl.errors import UserError
from rkl.eval import generation, refinement, tasks
from rkl.eval.results import make_result, save_result, sha256_file, sha256_json
from rkl.model.kernels import kernel_record
from rkl.model import merge
from rkl.model.surgery import CONFIG_FILE, SIDECAR_FILE, SURGERY_FILE
from rkl.paths import PHASE_STAGES, STAGE_CONFIGS, checkpoint_dir, eval_results_dir, logs_dir, stage_config_path
from rkl.determinism import deterministic_record
from rkl.runmeta import git_commit, peak_memory_mib

FULL_HASH_LIMIT = 1 << 30  # folders above 1 GiB get the cheap fingerprint (configs + file names and sizes)
# metrics that measure the machine, not the model: excluded when two evaluations are checked for equality
TIMING_METRICS = frozenset({f"{p}{m}" for p in ("", "cont_") for m in ("tpot_ms", "tpot_ms_plain", "tpot_uplift",
                                                                      "tokens_per_s", "tokens_per_s_plain")}
                           | {"peak_memory_mb"})
SMALL_MODEL_PARAMS = 100_000_000  # below this, CPU evaluation runs single-threaded (see cpu_threads)


def _make_command(stage: str) -> str:
    """The command that writes a stage's checkpoint."""
    if stage == "after_surgery":
        return "rkl surgery"
    phase = {v: k for k, v in PHASE_STAGES.items()}.get(stage)
    return f"rkl train --phase {phase}" if phase else ""


def resolve_model(stage: str, model: str | None) -> Path | str:
    if model is not None:
        path = Path(model)
        return path if path.exists() else model  # a preset name is resolved (and refused) by the loader
    folder = checkpoint_dir(stage)
    if folder.is_dir():
        return folder
    make = _make_command(stage)
    if make:
        raise UserError(f"no checkpoint for stage '{stage}' at {folder}: run `{make}` first (or pass --model)")
    stages = ", ".join(k for k in STAGE_CONFIGS if k != "pretrain")
    raise UserError(f"unknown stage '{stage}' and no --model: use one of {stages} or pass --model <checkpoint folder>")


def resolve_eval_config(stage: str, folder: Path | None, config_path: str | Path | None, overrides: list[str],
                        chunk_width: int | None) -> tuple[RecursiveConfig, str, bool]:
    """(config, where it came from, whether --chunk-width changed its chunk width)."""
    if config_path is not None:
        source = str(config_path)
    elif folder is not None and (folder / SIDECAR_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        source = str(folder / CONFIG_FILE)
    elif stage_config_path(stage).is_file():
        source = str(stage_config_path(stage))
    else:
        source = str(stage_config_path("baseline"))
    config = RecursiveConfig.from_file(source).with_overrides(list(overrides or []))
    if chunk_width is None or chunk_width == config.chunk_width:
        return config, source, False
    return config.replace(chunk_width=chunk_width), f"{source} (chunk_width {chunk_width} from --chunk-width)", True


def require_sidecar(config: RecursiveConfig, folder: Path | None) -> None:
    """Refuse recursion on a folder without a sidecar: a fresh (neutral) sidecar would be scored as if trained."""
    if config.recursive_enabled and folder is not None and not (folder / SIDECAR_FILE).is_file():
        raise UserError(f"{folder} has no {SIDECAR_FILE}, but the config turns recursion on: a fresh sidecar would be "
                        "scored as if trained; pass --set recursive_enabled=false, or finish that stage's training")


def load_for_eval(target: Path | str, config: RecursiveConfig, dtype: str | torch.dtype | None = None,
                  merge_lora: bool = False) -> tuple[Any, Any, RecursiveConfig]:
    """(wrapper in eval mode, tokenizer, config) of a resolved target, on the GPU when there is one; UserError for a
    folder without a tokenizer. What `rkl eval`, `rkl generate` and the lm-eval model all load through.
    merge_lora: fold a phase B/C checkpoint's LoRA adapters into the base weights (rkl.model.merge; no-op without
    LoRA)."""
    from rkl.model.surgery import load_model_with_config

    wrapper, tokenizer, config = load_model_with_config(target, config=config, dtype=dtype,
                                                        device_map="auto" if torch.cuda.is_available() else None)
    if tokenizer is None:
        raise UserError(f"{target} has no tokenizer: use a trained checkpoint folder "
                        "(`rkl train --phase pretrain` writes one)")
    if merge_lora:
        merge.merge_lora(wrapper.base)
    wrapper.eval()
    return wrapper, tokenizer, config


def checkpoint_record(model: Path | str) -> dict[str, Any]:
    """Path and sha256 of what is scored: results.sha256_file of the folder (every file's bytes), or for a folder
    over 1 GiB a fingerprint of its JSON files' bytes and every file's name and size (says which in "hash")."""
    path = Path(model)
    if not path.is_dir():
        return {"path": str(model), "sha256": None, "hash": "none (not a folder)"}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    rec: dict[str, Any] = {"path": str(path.resolve()), "bytes": size}
    if size <= FULL_HASH_LIMIT:
        rec.update(sha256=sha256_file(path), hash="sha256 of every file's bytes")
    else:
        h = hashlib.sha256()
        for p in files:
            rel = p.relative_to(path).as_posix()
            h.update(f"{rel}\0{p.stat().st_size}\n".encode())
            if p.suffix == ".json":
                h.update(p.read_bytes())
        rec.update(sha256=h.hexdigest(), hash="folder > 1 GiB: JSON files' bytes + every file's name and size")
    surgery = path / SURGERY_FILE
    if surgery.is_file():
        info = json.loads(surgery.read_text())
        rec.update(base=info.get("base"), base_sha256=info.get("base_sha256"))
    return rec


def _data_record(config: RecursiveConfig, stream: torch.Tensor, width: int, sizes: dict[str, int]) -> dict[str, Any]:
    info = describe_source(config.data, config.arithmetic_digits)
    if "stdlib" in info:
        info["stdlib"] = {k: v for k, v in info["stdlib"].items() if k != "files"}  # files_sha256 covers the list
    eval_set = {"split": "test", "max_chars_per_source": config.max_chars_per_source, "seed": tasks.EVAL_SEED,
                **sizes, "ppl_len": tasks.PPL_LEN, "chunk_batch": tasks.CHUNK_BATCH, "gen_batch": tasks.GEN_BATCH,
                "prefix_range": list(tasks.PREFIX_RANGE), "chunk_width": width,
                "corruption_rate": tasks.RESTORE_RATE, "corruption_mask": tasks.RESTORE_MASK,
                "restore_chunks": "model-sampled at the corrupted positions, exact edit rule",
                "arithmetic_digits": config.arithmetic_digits}
    return {**info, "eval_set": eval_set, "eval_set_sha256": sha256_json(eval_set), "test_tokens": int(stream.numel()),
            "test_stream_sha256": hashlib.sha256(stream.numpy().tobytes()).hexdigest()}


def _device_name(threads: int) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {threads} torch thread{'s' if threads > 1 else ''})"


@contextlib.contextmanager
def cpu_threads(wrapper) -> Iterator[None]:
    """One intra-op thread for a small model on CPU while evaluating, unless OMP_NUM_THREADS is set.

    A model this small gains nothing from a second thread, and on a shared 2-core machine two threads per process
    oversubscribe the cores: measured on the tiny preset with other jobs running, the chunk tasks took 48 s with 2
    threads and 2 s with 1."""
    n = torch.get_num_threads()
    # the base alone decides: baseline and after_surgery must run with the same threads to compare bitwise
    small = sum(p.numel() for p in wrapper.base.parameters()) < SMALL_MODEL_PARAMS
    if tasks.model_device(wrapper).type != "cpu" or not small or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _training_step(folder: Path | None) -> int:
    try:
        return int(json.loads((folder / "run.json").read_text()).get("step", 0)) if folder else 0
    except (OSError, ValueError, TypeError):
        return 0


def log_tensorboard(stage: str, metrics: dict[str, float], committed: list[int], log_dir: Path, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for name, value in metrics.items():
            writer.add_scalar(f"evaluation/{stage}/{name}", value, step)
        if committed:
            writer.add_histogram(f"evaluation/{stage}/committed_lengths", torch.tensor(committed), step)
    finally:
        writer.close()


def run_eval(stage: str, model: str | None = None, config_path: str | Path | None = None,
             overrides: list[str] | None = None, chunk_width: int | None = None, limit: int | None = None,
             dtype: str | None = None, merge_lora: bool = False, *, results_dir: Path | None = None,
             log_dir: Path | None = None, show_progress: bool = True) -> Path:
    """Evaluate one stage; returns the path of eval_results/<stage>.json (results_dir/log_dir override the
    conventional eval_results/ and logs/eval/<stage>/). merge_lora: score the stage with its LoRA adapters folded
    into the base weights (faster; in bf16 rounded differently from the model as trained), recorded in the result."""
    from rkl.model.surgery import load_model_with_config

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    target = resolve_model(stage, model)
    folder = Path(target) if Path(target).is_dir() else None
    config, config_source, width_changed = resolve_eval_config(stage, folder, config_path, overrides or [],
                                                               chunk_width)
    require_sidecar(config, folder)
    torch.manual_seed(config.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wrapper, tokenizer, config = load_for_eval(target, config, dtype, merge_lora=merge_lora)
    timings["load_s"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    docs = load_documents(config.data, "test", arithmetic_digits=config.arithmetic_digits,
                          max_chars=config.max_chars_per_source)
    stream = encode_documents(tokenizer, docs)
    width = config.chunk_width
    sizes = tasks.eval_sizes(tasks.model_device(wrapper).type, limit)
    problems = arithmetic_problems("test", config.arithmetic_digits)[: sizes["arith"]]
    data = _data_record(config, stream, width, sizes)
    timings["data_s"] = time.perf_counter() - t0

    eos = tokenizer.eos_token_id
    groups: list[tasks.Group] = []
    progress = Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), disable=not show_progress)
    runs = {  # name -> (examples, function of a progress callback)
        "perplexity": (sizes["windows"], lambda tick: tasks.perplexity(wrapper, stream, sizes["windows"], tick)),
        "chunks": (sizes["chunks"], lambda tick: refinement.chunk_tasks(wrapper, stream, config, eos,
                                                                        width, sizes["chunks"], tick)),
        "arithmetic": (len(problems), lambda tick: generation.arithmetic(wrapper, tokenizer, problems,
                                                                    config.arithmetic_digits, sizes["tpot"], tick)),
        "continuation": (sizes["cont"], lambda tick: generation.continuation(wrapper, stream, sizes["cont"], tick)),
    }
    with progress, torch.no_grad(), cpu_threads(wrapper):
        threads = torch.get_num_threads()
        bars = {name: progress.add_task(f"eval {name}", total=n) for name, (n, _) in runs.items()}
        plain = show_progress and not Console().is_terminal  # a log file: rich draws nothing there until the end
        for name, (n, fn) in runs.items():
            t0 = time.perf_counter()
            groups.append(fn(lambda k, bar=bars[name]: progress.advance(bar, k)))
            timings[f"{name}_s"] = time.perf_counter() - t0
            if plain:
                print(f"eval {name}: {n} examples in {timings[f'{name}_s']:.1f} s", file=sys.stderr, flush=True)

    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    stderr: dict[str, float] = {}
    extra: dict[str, Any] = {}
    for g in groups:
        metrics.update(g.metrics)
        counts.update(g.counts)
        stderr.update({k: v for k, v in g.stderr.items() if v == v})  # NaN SEs (one cluster) are left out
        extra.update(g.extra)
    metrics["peak_memory_mb"] = peak_memory_mib()
    t0 = time.perf_counter()
    ckpt = checkpoint_record(target)
    timings["hash_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    # A length-generalisation run (--chunk-width) or one with merged LoRA (--merge-lora) is its own result, never a
    # silent replacement of the stage's.
    lora = merge.lora_record(wrapper.base)
    name = merge.merged_name(f"{stage}_w{chunk_width}" if width_changed else stage, lora)
    result = make_result(
        name, metrics, counts=counts, stderr=stderr, config=config.to_dict(), checkpoint=ckpt, data=data,
        device=_device_name(threads), timings=timings, committed_lengths=extra.get("committed_lengths", []),
        greedy_sha256=extra.get("greedy_sha256"), recursion=wrapper.enabled,
        eval={"config_source": config_source, "limit": limit, "dtype": str(wrapper.base.dtype).replace("torch.", ""),
              "chunk_width": width, "max_inner_steps": config.max_inner_steps, "eval_seed": tasks.EVAL_SEED,
              "git_commit": git_commit(), "command": " ".join(sys.argv), "torch_threads": threads,
              **deterministic_record(), **kernel_record(), **lora})
    path = save_result(result, Path(results_dir) if results_dir is not None else eval_results_dir())
    log_tensorboard(name, metrics, result["committed_lengths"],
                    Path(log_dir) if log_dir is not None else logs_dir() / "eval" / name, _training_step(folder))
    return path
