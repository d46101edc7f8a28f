"""`rkl generate` and the per-chunk trace behind --show-steps, on the tiny checkpoints of every kind: the generation
is the model's (plain transformers agrees), stats change nothing, the trace adds up to the generation and follows
the commit rule, and bad input is one line with exit code 2."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoTokenizer, KimiLinearForCausalLM
from typer.testing import CliRunner

from rkl.cli import app
from rkl.data.prompts import encode_prompt
from rkl.model.surgery import load_model_with_config
from rkl.model.trace import chunk_traces
from rkl.model.wrapper import ChunkRefineWrapper

runner = CliRunner()
PROMPT = "12+34="
NEW = 10
X = 7  # the token a forced edit writes


def generate(stages, stage: str, *args: str):
    result = runner.invoke(app, ["generate", "--stage", stage, "--model", str(stages / stage), *args],
                           env={"COLUMNS": "200"})
    return result


def plain_transformers(stages, prompt: str, new: int) -> str:
    """The baseline folder through transformers alone: its tokenizer adds the <eos> separator by itself."""
    tok = AutoTokenizer.from_pretrained(stages / "baseline")
    model = KimiLinearForCausalLM.from_pretrained(stages / "baseline").eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == encode_prompt(tok, prompt)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)[0, ids.shape[1]:]
    return tok.decode(out.tolist(), skip_special_tokens=True)


def force_edit_at(monkeypatch, position: int = 1) -> None:
    """Every inner loop 'edits' chunk position `position` of row 0 at its last step (a stand-in for a trained sidecar
    changing its mind), whenever that position is editable."""
    original = ChunkRefineWrapper.refine_chunk

    def patched(self, chunk, *args, **kwargs):
        res = original(self, chunk, *args, **kwargs)
        editable = args[2] if len(args) > 2 else kwargs["editable"]
        if editable.shape[1] > position and bool(editable[0, position]):
            final = res.final_tokens.clone()
            final[0, position] = X if int(final[0, position]) != X else X + 1
            res.tokens[-1] = final
            res.final_tokens = final
        return res

    monkeypatch.setattr(ChunkRefineWrapper, "refine_chunk", patched)


def without_eos(monkeypatch) -> None:
    """generate_chunks runs to max_new_tokens (the tiny model emits EOS after a few tokens): several chunks to trace."""
    monkeypatch.setattr("rkl.model.generate.special_tokens", lambda base: (None, 0))


def test_every_kind_of_stage_generates_what_plain_transformers_does(tiny_stages):
    expected = plain_transformers(tiny_stages, PROMPT, NEW)
    for stage in ("baseline", "after_surgery", "phase_a"):
        result = generate(tiny_stages, stage, "-n", str(NEW), PROMPT)
        assert result.exit_code == 0, result.output
        if stage != "phase_a":  # a trained sidecar may change tokens; baseline and the neutral one never do
            assert result.stdout == PROMPT + expected + "\n", stage


def test_the_prompt_goes_in_by_the_prompt_convention(tiny_stages, monkeypatch):
    seen = []
    original = ChunkRefineWrapper.generate_chunks

    def record(self, input_ids, *args, **kwargs):
        seen.append(input_ids[0].tolist())
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(ChunkRefineWrapper, "generate_chunks", record)
    assert generate(tiny_stages, "phase_a", "-n", "2", PROMPT).exit_code == 0
    assert seen == [encode_prompt(AutoTokenizer.from_pretrained(tiny_stages / "baseline"), PROMPT)]


def test_a_prompt_file_gives_each_prompt_its_own_generation(tiny_stages, tmp_path):
    prompts = ["12+34=", "", "7+8="]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    result = generate(tiny_stages, "after_surgery", "-n", "6", "--file", str(tmp_path / "p.txt"))
    assert result.exit_code == 0, result.output
    alone = [generate(tiny_stages, "after_surgery", "-n", "6", p).stdout for p in ("12+34=", "7+8=")]
    assert result.stdout == "\n".join(alone)  # blank lines skipped; a blank line between generations


def test_stats_change_nothing_and_the_trace_adds_up_to_the_generation(tiny_stages, monkeypatch):
    force_edit_at(monkeypatch)
    without_eos(monkeypatch)
    wrapper, tok, cfg = load_model_with_config(tiny_stages / "after_surgery")
    wrapper.eval()
    ids = torch.tensor([encode_prompt(tok, PROMPT)])
    plain = wrapper.generate_chunks(ids, max_new_tokens=NEW)
    out, stats = wrapper.generate_chunks(ids, max_new_tokens=NEW, return_stats=True)
    assert torch.equal(out, plain)
    traces = chunk_traces(stats, cfg.max_inner_steps)
    assert sum((t.committed for t in traces), []) == out[0, ids.shape[1]:].tolist()
    edited = 0
    for t in traces:
        assert len(t.steps) == cfg.max_inner_steps and [s.step for s in t.steps] == list(range(1, len(t.steps) + 1))
        changed = sorted({j for s in t.steps for j, _, _ in s.changed})
        if changed:
            edited += 1
            assert t.steps[-1].changed[0][2] in (X, X + 1) and changed[0] >= t.locked
            assert len(t.committed) == changed[0] + 1 - t.locked  # up to and including the first changed token
        else:
            assert t.committed == t.draft[t.locked:]
    assert edited >= 2


def test_show_steps_prints_draft_changes_p_commit_and_commits(tiny_stages, monkeypatch):
    force_edit_at(monkeypatch)
    without_eos(monkeypatch)
    result = generate(tiny_stages, "after_surgery", "-n", str(NEW), "--show-steps", PROMPT)
    assert result.exit_code == 0, result.output
    out = result.stdout
    chunks = re.findall(r"^chunk (\d+) ", out, re.M)
    assert chunks and chunks == [str(i + 1) for i in range(len(chunks))]
    assert len(re.findall(r"^  draft ", out, re.M)) == len(chunks)
    assert len(re.findall(r"^  step \d+ +p_commit \d\.\d{3} ", out, re.M)) == 2 * len(chunks)  # K = 2 steps each
    assert re.search(r"changed 1: pos 1 \S+->\S+", out)
    committed = [int(n) for n in re.findall(r"^  committed (\d+): ", out, re.M)]
    assert len(committed) == len(chunks) and sum(committed) == NEW and 2 in committed
    assert "recursion on: W = 4, K = 2" in out


def test_show_steps_on_a_recursion_off_stage_says_there_are_no_chunks(tiny_stages):
    result = generate(tiny_stages, "baseline", "-n", "4", "--show-steps", PROMPT)
    assert result.exit_code == 0, result.output
    assert "recursion off" in result.output and "chunk 1" not in result.output


def test_chunk_width_and_inner_steps_flags_reach_the_generation(tiny_stages, monkeypatch):
    without_eos(monkeypatch)
    result = generate(tiny_stages, "after_surgery", "-n", "6", "--show-steps", "--chunk-width", "3",
                      "--max-inner-steps", "1", PROMPT)
    assert result.exit_code == 0, result.output
    assert "W = 3, K = 1" in result.output and "chunk 2  (3 positions" in result.output
    assert len(re.findall(r"^  step ", result.output, re.M)) == 2


def one_line_error(result) -> str:
    """The one line a user error prints (beside transformers' weight-loading bar when the model was loaded)."""
    assert result.exit_code == 2, result.output
    assert not result.stdout.strip(), result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["-n", "0", PROMPT], "--max-new-tokens must be >= 1"),
    (["-n", "4", "9" * 8200], "more than the model's context of 8192 tokens"),
    (["-n", "4"], "give a prompt or --file"),
    (["-n", "4", "--file", "/nonexistent/prompts.txt"], "cannot read --file"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_stages, args, message):
    assert message in one_line_error(generate(tiny_stages, "after_surgery", *args))


def test_a_missing_stage_is_one_line_and_exit_2(tmp_path, monkeypatch):
    from rkl.paths import project_root

    (tmp_path / "configs").symlink_to(project_root() / "configs")
    monkeypatch.chdir(tmp_path)  # the project root is now tmp_path: no checkpoints/ there
    line = one_line_error(runner.invoke(app, ["generate", "--stage", "phase_b", PROMPT], env={"COLUMNS": "200"}))
    assert "no checkpoint for stage 'phase_b'" in line
    line = one_line_error(runner.invoke(app, ["generate", "--stage", "x", "--model", str(tmp_path / "none"), PROMPT]))
    assert "none" in line


def test_help_names_every_flag():
    out = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--stage", "--file", "--max-new-tokens", "--chunk-width", "--max-inner-steps", "--show-steps",
                 "--model", "--set"):
        assert flag in out, flag
