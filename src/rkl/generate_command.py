"""`rkl generate --stage S "prompt"`: greedy generations of a stage, and with --show-steps what each chunk's inner
loop did (draft, the tokens each step changed, p_commit per step, the committed tokens).

Each prompt is generated alone (a batch of one): the rows of a batch share one cache that advances by their smallest
commit, so a prompt's output would otherwise depend on what else is in the file. Prompts are encoded with the
prompt convention (rkl.data.prompts: `<eos>` first). Recursion-off stages (baseline) decode with `base.generate`,
so they have no chunks to show.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from rkl.data.prompts import encode_prompt
from rkl.errors import UserError
from rkl.model.trace import ChunkTrace, chunk_traces
from rkl.stage_model import StageModel, load_stage_model


def read_prompts(prompt: str | None, file: Path | None) -> list[str]:
    """The prompt argument, or the file's lines (one prompt a line, blank lines skipped); exactly one of the two."""
    if (prompt is None) == (file is None):
        raise UserError("give a prompt or --file FILE (one prompt a line), not both and not neither")
    if prompt is not None:
        return [prompt]
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read --file {file}: {e.strerror or e}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--file {file} holds no prompt (one prompt a line)")
    return prompts


def piece(tokenizer, token: int) -> str:
    """One token as text, whitespace made visible (a newline shows as \\n)."""
    return tokenizer.decode([token], skip_special_tokens=False).encode("unicode_escape").decode("ascii")


def render_chunk(trace: ChunkTrace, tokenizer, console: Console) -> None:
    changed_at = {j for s in trace.steps for j, _, _ in s.changed}
    draft = Text("  draft     ")
    for j, t in enumerate(trace.draft):
        style = "dim" if j < trace.locked else ("bold yellow" if j in changed_at else "cyan")
        draft.append(piece(tokenizer, t), style=style)
        draft.append("|", style="dim")
    console.print(Text(f"chunk {trace.index}  ({len(trace.draft)} positions, {trace.locked} locked)", style="bold"))
    console.print(draft, soft_wrap=True)
    for s in trace.steps:
        line = Text(f"  step {s.step}    p_commit {s.p_commit:.3f}  ")
        if not s.changed:
            line.append("changed nothing", style="dim")
        else:
            line.append(f"changed {len(s.changed)}: ")
            for k, (j, old, new) in enumerate(s.changed):
                line.append(("" if k == 0 else ", ") + f"pos {j} ")
                line.append(piece(tokenizer, old), style="red strike")
                line.append("->")
                line.append(piece(tokenizer, new), style="green")
        console.print(line, soft_wrap=True)
    stop = (f"the commit head stopped the loop at step {len(trace.steps)} of {trace.max_inner_steps}"
            if trace.stopped_early else f"all {trace.max_inner_steps} steps ran")
    done = Text(f"  committed {len(trace.committed)}: ")
    done.append(tokenizer.decode(trace.committed, skip_special_tokens=False).encode("unicode_escape").decode("ascii"),
                style="bold green")
    done.append(f"  ({stop})", style="dim")
    console.print(done, soft_wrap=True)


def generate_one(model: StageModel, prompt: str, max_new_tokens: int) -> tuple[list[int], list[dict]]:
    """(new token ids up to and without EOS, generate_chunks' stats) for one prompt."""
    ids = torch.tensor([encode_prompt(model.tokenizer, prompt)], device=model.device)
    if ids.shape[1] + max_new_tokens > model.max_length:
        raise UserError(f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} that is more than "
                        f"the model's context of {model.max_length} tokens: shorten the prompt or generate fewer tokens")
    out, stats = model.wrapper.generate_chunks(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                               do_sample=False, return_stats=True)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.tokenizer.eos_token_id
    return (new[: new.index(eos)] if eos in new else new), stats


def run_generate(stage: str, prompts: list[str], console: Console, model: str | None = None,
                 config_path: Path | None = None, overrides: list[str] | None = None, max_new_tokens: int = 64,
                 chunk_width: int | None = None, max_inner_steps: int | None = None, dtype: str | None = None,
                 show_steps: bool = False, merge_lora: bool = False) -> list[str]:
    """Generate each prompt, print it (and its trace), return the generated texts."""
    from rkl.eval.runner import cpu_threads

    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    extra = [f"max_inner_steps={max_inner_steps}"] if max_inner_steps is not None else []
    loaded = load_stage_model(stage, model=model, config_path=config_path, overrides=list(overrides or []) + extra,
                              chunk_width=chunk_width, dtype=dtype, merge_lora=merge_lora)
    cfg, tok = loaded.config, loaded.tokenizer
    if show_steps:
        what = (f"recursion on: W = {cfg.chunk_width}, K = {cfg.max_inner_steps}, commit threshold "
                f"{cfg.commit_threshold} -> {cfg.min_commit_threshold}" if cfg.recursive_enabled
                else "recursion off: plain decoding, no chunks to show")
        console.print(f"[dim]{escape(str(loaded.model))} ({escape(loaded.config_source)}); {what}[/]", soft_wrap=True)
    texts = []
    with torch.no_grad(), cpu_threads(loaded.wrapper):
        for i, prompt in enumerate(prompts):
            new, stats = generate_one(loaded, prompt, max_new_tokens)
            text = tok.decode(new, skip_special_tokens=True)
            texts.append(text)
            if i:
                console.print()
            if show_steps:
                for trace in chunk_traces(stats, cfg.max_inner_steps):
                    render_chunk(trace, tok, console)
            out = Text(prompt, style="dim")
            out.append(text, style="bold")
            console.print(out, soft_wrap=True)
    return texts
