"""The training loop every phase shares: AdamW groups, warmup+cosine, clipping, accumulation, autocast,
TensorBoard, periodic validation, atomic checkpoints and exact resume.

A phase plugs in as a `TrainTask`: it owns its model(s) and data and says what one micro-batch's loss is.
Batches are a pure function of (seed, step, micro-batch), so a resumed run sees exactly the batches an
uninterrupted run would, and with optimizer, scheduler and RNG state restored it ends at the same weights.

Data parallel (several processes, launched by `accelerate launch --num_processes N` on GPUs or `torchrun
--nproc_per_node N` on CPUs): `batch_size` is per process; every process builds the same global batch of
batch_size x N rows and takes its own slice (a pure function of seed, step and rank, so resume stays exact); after
the backward passes the gradients are averaged across processes (an all-reduce of every trainable tensor: the
tasks call their models' own methods, not one module's forward, so a DDP wrapper would not see them). Every
process validates the same held-out batches; only the main process writes checkpoints, run.json, TensorBoard and
the progress bar, with scalars averaged (tokens summed) across processes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

from rkl.config import RecursiveConfig
from rkl.errors import UserError
from rkl.runmeta import peak_memory_mib
from rkl.train.checkpoint import (_FAULT_STEP, RunLock, StateParts, checkpoint_folder, fault_point, load_training_state,
                                  rng_state, set_rng_state, write_checkpoint_files)
from rkl.train.optim import build_optimizer, build_scheduler
from rkl.train.sharding import clip_gradients, full_optimizer_state, is_sharded, shard_optimizer_state


class TrainTask(Protocol):
    """What a phase provides to the shared loop."""

    def trainable_groups(self) -> dict[str, tuple[list[torch.nn.Parameter], float]]: ...
    def train_mode(self, training: bool) -> None: ...
    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch plus scalars to log (must include 'tokens': tokens processed)."""
    def validate(self) -> dict[str, float]: ...
    def save_weights(self, out_dir: Path) -> None:
        """Called on the main process only, after save_sharded."""
    def save_sharded(self, folder: Path | None) -> None:
        """Called on every process first in a save (collective where FSDP shards trained tensors): write the sharded
        tensors, gathered whole, into the checkpoint folder on the main process (None on the others)."""
    def run_facts(self) -> dict:
        """What run.json records of how the task ran so far, read at each checkpoint (e.g. a CUDA graph given up)."""


@dataclass
class TrainResult:
    steps_done: int
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged step
    val_history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False
    checkpoint_step: int = 0  # the step of the newest checkpoint in the output folder (0: none)


# Autocast without its cache of weight casts. The recursive phases run a layer without gradient (prefix pass, draft
# walk) and then with it (the K inner steps) in one autocast region, and with the layer sharded by FSDP2 the cache
# left the sharded nn.Linear weights (phase C's unfrozen layers) without gradient (tests/test_fsdp_phases.py shows
# it; docs/benchmarks.md, 2026-12-02). Without the cache each use casts the trainable float32 weights again (7-8% of
# a step on one H200, 2026-12-03); the bf16 base weights are not cast either way.
AUTOCAST = AutocastKwargs(cache_enabled=False)


def make_accelerator(config: RecursiveConfig) -> Accelerator:
    """bf16 autocast on GPU, plain fp32 on CPU."""
    on_gpu = torch.cuda.is_available()
    return Accelerator(cpu=not on_gpu, mixed_precision="bf16" if on_gpu else "no", kwargs_handlers=[AUTOCAST])


MAX_BAD_STEPS = 5      # non-finite steps in a row before a run gives up (exit 2)
PLAIN_EVERY_S = 30.0   # seconds between progress lines when the output is not a terminal


def _say(line: str, main: bool) -> None:
    if main:
        print(line, file=sys.stderr, flush=True)


class _NoWriter:
    """SummaryWriter's interface for processes that do not log."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    flush = close = add_scalar


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over the processes (a tensor that got no gradient here contributes zeros). Tensors FSDP
    shards (rkl.train.sharding) arrive averaged already, by its reduce-scatter."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if not is_sharded(p):
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def _reduce_scalars(scalars: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over processes, except 'tokens' (summed: the global batch's)."""
    keys = sorted(scalars)
    t = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    world = torch.distributed.get_world_size()
    return {k: float(v) if k == "tokens" else float(v) / world for k, v in zip(keys, t.tolist())}


def train(task: TrainTask, config: RecursiveConfig, out_dir: Path, log_dir: Path, meta: dict,
          accelerator: Accelerator, resume: bool = False, stop_at: int | None = None,
          show_progress: bool = True) -> TrainResult:
    """Run config.steps optimizer steps (or until `stop_at`), checkpointing into out_dir."""
    world, main = accelerator.num_processes, accelerator.is_main_process
    meta = {**meta, "world_size": world}
    lock = RunLock(out_dir) if main else contextlib.nullcontext()
    with lock:
        return _train(task, config, out_dir, log_dir, meta, accelerator, resume, stop_at, show_progress, world, main)


def _train(task: TrainTask, config: RecursiveConfig, out_dir: Path, log_dir: Path, meta: dict,
           accelerator: Accelerator, resume: bool, stop_at: int | None, show_progress: bool, world: int,
           main: bool) -> TrainResult:
    optimizer = build_optimizer(task.trainable_groups(), config)
    scheduler = build_scheduler(optimizer, config)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    start = 0
    if resume:
        state = load_training_state(out_dir)
        if state is not None:
            optimizer.load_state_dict(shard_optimizer_state(optimizer, state["optimizer"]))
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start = state["step"]
            del state  # with FSDP: the whole optimizer state, of which this process keeps its shards
    # a resumed run logs steps start + 1 onward: hide what a killed run logged from there on (not the checkpoint step)
    writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start else None) if main else _NoWriter()
    result = TrainResult(steps_done=start, checkpoint_step=start)
    sharded = any(is_sharded(p) for p in params)
    end = config.steps if stop_at is None else min(stop_at, config.steps)

    def checkpoint(step: int) -> None:
        _FAULT_STEP[0] = step
        writer.flush()  # every logged step up to a checkpoint is on disk with it: a resume from it loses no point
        with checkpoint_folder(out_dir, main) as folder:
            task.save_sharded(folder)  # collective where FSDP shards trained tensors, as is the optimizer state's
            if main:
                task.save_weights(folder)
            optimizer_state = full_optimizer_state(optimizer, main, StateParts(folder) if main and sharded else None)
            if main:
                training_state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                                  "rng": rng_state(), "step": step}
                write_checkpoint_files(folder, config, {**meta, **task.run_facts(), "step": step}, training_state)
        accelerator.wait_for_everyone()
        result.checkpoint_step = step

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        disable=not (show_progress and main))
    def validate(step: int) -> None:
        task.train_mode(False)
        val = task.validate()
        for k, v in val.items():
            writer.add_scalar(f"val/{k}", v, step)
        result.val_history.append({"step": step, **val})

    bad_in_a_row = skipped = 0
    plain = show_progress and main and not Console().is_terminal
    t_start = last_line = time.perf_counter()
    try:
        if start == 0:
            validate(0)  # the untrained starting point every later number is compared with
        with progress:
            bar = progress.add_task("train", total=config.steps, completed=start, info="", rate="")
            for step in range(start, end):
                t0 = time.perf_counter()
                task.train_mode(True)
                scalars: dict[str, float] = {}
                for micro in range(config.grad_accum):
                    with accelerator.autocast():
                        loss, micro_scalars = task.loss(step, micro)
                    accelerator.backward(loss / config.grad_accum)
                    for k, v in micro_scalars.items():
                        scalars[k] = scalars.get(k, 0.0) + (v if k == "tokens" else v / config.grad_accum)
                if world > 1:
                    _all_reduce_grads(params, world)
                    scalars = _reduce_scalars(scalars, accelerator.device)
                grad_norm = clip_gradients(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
                if torch.isfinite(grad_norm):  # a NaN/inf loss or gradient gives a non-finite norm (on every rank)
                    optimizer.step()
                    bad_in_a_row = 0
                else:
                    bad_in_a_row += 1
                    skipped += 1
                    _say(f"warning: step {step + 1}: the loss or gradient is not finite; step skipped "
                         f"({bad_in_a_row} in a row)", main)
                    if bad_in_a_row >= MAX_BAD_STEPS:
                        raise UserError(f"the loss or gradient was not finite for {MAX_BAD_STEPS} steps in a row "
                                        f"(last at step {step + 1}); nothing was updated from them. Lower the learning "
                                        "rates, or use --dtype float32; the last checkpoint in --out is intact")
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps_done = step + 1  # from here on, an interrupt checkpoints this step
                fault_point("step", step + 1)
                elapsed = time.perf_counter() - t0
                scalars.update(grad_norm=float(grad_norm), tokens_per_s=scalars.get("tokens", 0.0) / elapsed,
                               skipped_steps=float(skipped))
                if (step + 1) % config.log_interval == 0 or step == start or step + 1 == config.steps:
                    _log_step(writer, step + 1, scalars, optimizer)
                    result.history.append({"step": step + 1, **scalars})
                if (step + 1) % config.eval_interval == 0 or step + 1 == config.steps:
                    validate(step + 1)
                if (step + 1) % config.save_interval == 0 or step + 1 == config.steps:
                    checkpoint(step + 1)
                progress.update(bar, advance=1, info=f"loss {scalars.get('loss', float('nan')):.3f}",
                                rate=f"{scalars['tokens_per_s']:.0f} tok/s")
                if plain and (time.perf_counter() - last_line >= PLAIN_EVERY_S or step + 1 in (start + 1, end)):
                    # output to a file or pipe: rich draws nothing there until the end, so print a line
                    last_line = time.perf_counter()
                    done = step + 1 - start
                    eta = (last_line - t_start) / done * (end - step - 1)
                    _say(f"step {step + 1}/{config.steps}  loss {scalars.get('loss', float('nan')):.4f}  "
                         f"{scalars['tokens_per_s']:.0f} tok/s  eta {eta / 60:.1f} min", main)
        if end < config.steps:  # --stop-at: behave as an interrupt, with a checkpoint to resume from
            if result.steps_done % config.save_interval:
                checkpoint(result.steps_done)
            result.interrupted = True
    except KeyboardInterrupt:
        # Keep the work done: checkpoint the last completed step, then let the caller report it. Not where FSDP shards
        # trained tensors: the processes may be interrupted at different points, so the gathers a save needs could
        # pair up wrongly; the last periodic checkpoint stands.
        if result.steps_done > start and not sharded:
            checkpoint(result.steps_done)
        elif sharded:
            _say(f"interrupted: with FSDP-sharded weights no checkpoint is written on an interrupt; --resume continues "
                 f"from the last periodic one (step {result.checkpoint_step}, save_interval {config.save_interval})",
                 main)
        result.interrupted = True
    finally:
        writer.flush()
        writer.close()
    return result


def _log_step(writer: SummaryWriter, step: int, scalars: dict[str, float], optimizer: torch.optim.Optimizer) -> None:
    for k, v in scalars.items():
        if k == "loss":
            writer.add_scalar("train/loss/total", v, step)
        elif k.startswith("loss_"):
            writer.add_scalar(f"train/loss/{k[5:]}", v, step)
        elif k != "tokens":
            writer.add_scalar(f"train/{k}", v, step)
    for group in optimizer.param_groups:
        if not group["name"].endswith("_nodecay"):
            writer.add_scalar(f"train/lr/{group['name']}", group["lr"], step)
    writer.add_scalar("train/peak_mem_gib", peak_memory_mib() / 2**10, step)
