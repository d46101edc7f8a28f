"""`rkl train --phase X`: build the phase's task from its starting checkpoint and run the shared loop.

pretrain: the tiny base from scratch (tokenizer trained on the training split) -> checkpoints/baseline
vanilla:  the base fine-tuned on the same data and token budget, recursion off -> checkpoints/finetuned_vanilla
a, b, c:  the recursive phases (rkl.train.refine_phases) -> checkpoints/phase_{a,b,c}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rkl.config import RecursiveConfig
from rkl.data.corpora import describe_source, load_documents
from rkl.data.packing import encode_documents
from rkl.data.tokenizer import train_tokenizer
from rkl.errors import UserError
from rkl.model.base import is_checkpoint_dir, load_base
from rkl.paths import PHASE_INIT, checkpoint_dir
from rkl.runmeta import run_metadata
from rkl.train.checkpoint import has_training_state
from rkl.train.lm import LMTask
from rkl.train.loop import TrainResult, make_accelerator, train
from rkl.train.sharding import refuse_fsdp_for_full_fine_tunes

PHASES = ("pretrain", "vanilla", "a", "b", "c")


@dataclass
class PhaseRun:
    phase: str
    config: RecursiveConfig
    model: str          # what the phase starts from (preset name or checkpoint folder)
    out: Path
    log_dir: Path
    resume: bool = False
    stop_at: int | None = None
    dtype: str | None = None
    show_progress: bool = True


def default_init(phase: str) -> str:
    """The checkpoint (or preset) a phase starts from by convention."""
    if phase == "pretrain":
        return "tiny"
    stage = PHASE_INIT[phase]
    return str(checkpoint_dir("baseline" if stage == "pretrain" else stage))


def run_phase(run: PhaseRun) -> TrainResult:
    if run.phase not in PHASES:
        raise UserError(f"unknown phase '{run.phase}' (phases: {', '.join(PHASES)})")
    refuse_fsdp_for_full_fine_tunes(run.phase)
    torch.manual_seed(run.config.seed)
    if run.phase in ("pretrain", "vanilla"):
        return _run_lm_phase(run)
    from rkl.train.refine_phases import run_refine_phase  # the recursive phases need the wrapper

    return run_refine_phase(run)


def resume_source(run: PhaseRun) -> str:
    """Where the weights come from: the run's own checkpoint when resuming, else the phase's init."""
    if run.resume:
        if not has_training_state(run.out):  # not loaded here: at 48B the state is ~133 GB
            raise UserError(f"--resume: no resumable checkpoint in {run.out} (run without --resume to start)")
        saved = RecursiveConfig.from_file(run.out / "recursive_config.json").to_dict()
        differs = sorted(k for k, v in run.config.to_dict().items() if k != "steps" and saved[k] != v)
        if differs:
            raise UserError(f"--resume with a config that differs from the run's saved one in {', '.join(differs)}; "
                            f"use the same --recursive-config/--set as the interrupted run (only --steps may change)")
        return str(run.out)
    return run.model


def documents(config: RecursiveConfig, split: str) -> list[str]:
    return load_documents(config.data, split, arithmetic_digits=config.arithmetic_digits,
                          max_chars=config.max_chars_per_source)


def token_streams(config: RecursiveConfig, tokenizer, train_docs: list[str] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    train_docs = documents(config, "train") if train_docs is None else train_docs
    return encode_documents(tokenizer, train_docs), encode_documents(tokenizer, documents(config, "val"))


def _run_lm_phase(run: PhaseRun) -> TrainResult:
    config = run.config
    accelerator = make_accelerator(config)
    source = resume_source(run)
    if run.phase == "vanilla" and not is_checkpoint_dir(source):
        raise UserError(f"vanilla fine-tunes a trained base, but {source} is not a checkpoint; "
                        "run `rkl train --phase pretrain` first or pass --model")
    model, tokenizer = load_base(source, dtype=run.dtype, seed=config.seed)
    train_docs = None
    if tokenizer is None:
        train_docs = documents(config, "train")
        # A big preset vocabulary on a small corpus leaves embedding rows unused rather than failing.
        tokenizer = train_tokenizer(train_docs, model.config.vocab_size, exact=False)
    model.to(accelerator.device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train_stream, val_stream = token_streams(config, tokenizer, train_docs)
    meta = run_metadata(phase=run.phase, init=run.model, seed=config.seed,
                        data=describe_source(config.data, config.arithmetic_digits),
                        train_tokens=int(train_stream.numel()), val_tokens=int(val_stream.numel()),
                        parameters=sum(p.numel() for p in model.parameters()), tokenizer_size=len(tokenizer))
    task = LMTask(model, tokenizer, config, train_stream, val_stream, accelerator.device,
                  shard=(accelerator.process_index, accelerator.num_processes))
    return train(task, config, run.out, run.log_dir, meta, accelerator, resume=run.resume, stop_at=run.stop_at,
                 show_progress=run.show_progress)
