"""The README's bad-input table, one test per row: each mistake ends in exit code 2 and one `error:` line (the last
line on stderr) that names the cause and the fix, with no traceback, and every file that existed before is left as
it was (a run may only add its own TensorBoard logs).

The table in the README is what these rows print (paths relative to the folder the command ran in); regenerate it
with `.venv/bin/python tests/test_bad_input.py` after changing a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rkl.cli import app
from rkl.paths import project_root

runner = CliRunner()
DATA = ["--set", "data=arithmetic", "--set", "max_chars_per_source=5000", "--set", "arithmetic_digits=2"]
TINY = ["--steps", "1", "--batch-size", "2", "--set", "seq_len=16", "--set", "eval_batches=1", *DATA]
TABLE_START = "| mistake | command | what rkl says (exit code 2) |"
README = Path(__file__).resolve().parents[1] / "README.md"  # the commands run in other folders


@dataclass
class Row:
    mistake: str
    args: list[str]
    expect: tuple[str, ...]             # substrings of the error line: its cause and its fix
    setup: Callable[[Path], None] | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # what the command cannot be made to do on a CPU

    @property
    def command(self) -> str:
        return "rkl " + " ".join(f"'{a}'" if (" " in a or "[" in a) else a for a in self.args)


# --- setups: files a mistake needs, made before the snapshot of what exists -------------------------------
def copy_stage(name: str, to: str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        shutil.copytree(work / "ck" / name, work / to, symlinks=False)
    return setup


def truncated(name: str, to: str, file: str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        copy_stage(name, to)(work)
        path = work / to / file
        path.write_bytes(path.read_bytes()[:1000])
    return setup


def write(path: str, text: str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
    return setup


def locked(out: str) -> Callable[[Path], None]:
    return write(f"{out}.lock", f"{os.getpid()}\n")  # a live holder: this test process


def evaluated(stage: str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        from rkl.eval.results import make_result, save_result

        save_result(make_result(stage, {"perplexity": 10.0}), work / "eval_results")
    return setup


def without_tokenizer(work: Path) -> None:
    copy_stage("base", "notok")(work)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (work / "notok" / name).unlink(missing_ok=True)


def base_gone(work: Path) -> None:
    copy_stage("surgery", "lone/surgery")(work)
    info = json.loads((work / "lone/surgery/surgery.json").read_text())
    info.update(base=str(work / "gone" / "base"), base_relative="../base")
    (work / "lone/surgery/surgery.json").write_text(json.dumps(info))


def out_of_memory(task: str, gpu: bool = True) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(mp: pytest.MonkeyPatch) -> None:
        import torch

        def loss(self, step, micro):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if gpu else MemoryError()
        mp.setattr(task, loss)
    return patch


A = ["train", "--phase", "a", "--model", "ck/surgery"]
EVAL = ["eval", "--stage", "s", "--limit", "1"]
ROWS = [
    Row("fp16 on a CPU", [*A, "--dtype", "fp16", "--out", "out/a"], ("float16 needs a GPU", "--dtype float32")),
    Row("two runs into one --out at once", [*A, "--out", "out/a"], ("being written by another run (pid", "another --out"),
        setup=locked("out/a")),
    Row("a re-run into a finished --out, without --resume", [*A, "--out", "ck/phase_a"],
        ("already holds a checkpoint", "--resume", "--overwrite")),
    Row("surgery on a base with a truncated model.safetensors", ["surgery", "--model", "bad/base", "--out", "out/s"],
        ("model.safetensors is unreadable", "re-run the stage"), setup=truncated("base", "bad/base", "model.safetensors")),
    Row("eval of a base with a truncated model.safetensors", [*EVAL, "--model", "bad/base"],
        ("model.safetensors is unreadable", "re-run the stage"), setup=truncated("base", "bad/base", "model.safetensors")),
    Row("phase b from a phase A folder with a truncated sidecar.safetensors",
        ["train", "--phase", "b", "--model", "bad/phase_a", "--out", "out/b"],
        ("sidecar.safetensors is unreadable", "re-run the stage"),
        setup=truncated("phase_a", "bad/phase_a", "sidecar.safetensors")),
    Row("--resume of a run with other settings than the interrupted one",
        [*A, "--resume", "--out", "ck/phase_a"], ("differs from the run's saved one in", "same --recursive-config/--set")),
    Row("--resume where nothing was saved", [*A, "--resume", "--out", "out/a"],
        ("no resumable checkpoint in out/a", "without --resume")),
    Row("--set lr on phase a (it has its own learning rates)", [*A, "--set", "lr=0.1", "--out", "out/a"],
        ("lr is not used by phase a", "lr_refine")),
    Row("--set of a refinement field on pretrain", ["train", "--phase", "pretrain", "--set", "corruption_rate=0.5"],
        ("corruption_rate is not used by phase pretrain", "read by train a, b, c")),
    Row("--set of a training field on eval", [*EVAL, "--model", "ck/phase_a", "--set", "steps=5"],
        ("steps is not used by rkl eval", "read by train")),
    Row("a phase B config whose d_state contradicts the phase A checkpoint",
        ["train", "--phase", "b", "--model", "ck/phase_a", "--set", "d_state=32", "--out", "out/b"],
        ("d_state: the sidecar in ck/phase_a was built with 64", "drop d_state")),
    Row("phase a from a model preset", ["train", "--phase", "a", "--model", "tiny", "--out", "out/a"],
        ("is a model preset", "rkl surgery --model tiny")),
    Row("compare of a stage never evaluated", ["compare", "phase_a", "phase_z"],
        ("phase_z", "evaluated so far: phase_a"), setup=evaluated("phase_a")),
    Row("a misspelt field", ["config", "--stage", "phase_b", "--set", "lora_rnak=16"],
        ("unknown config key(s): lora_rnak", "did you mean lora_rank")),
    Row("a config file that is not valid JSON", [*A, "-c", "bad.json", "--out", "out/a"],
        ("bad.json is not valid JSON", "line 1 column 2"), setup=write("bad.json", "{chunk_width: 8}")),
    Row("a config file that does not exist", [*A, "-c", "missing.json", "--out", "out/a"],
        ("config file not found: missing.json", "check the path")),
    Row("a config that inherits a file that does not exist", [*A, "-c", "mine.json", "--out", "out/a"],
        ('"inherits": recursive_phase_z.json not found', "looked in"),
        setup=write("mine.json", '{"inherits": "recursive_phase_z.json", "lora_rank": 16}')),
    Row("a value of the wrong type", [*A, "--set", "chunk_width=wide", "--out", "out/a"],
        ("chunk_width: expected int, got str 'wide'",)),
    Row("a value out of range", [*A, "--set", "corruption_rate=3", "--out", "out/a"],
        ("corruption_rate: 3.0 is above the maximum 1.0",)),
    Row("--set without a value", [*A, "--set", "chunk_width", "--out", "out/a"], ("--set expects key=value",)),
    Row("commit_threshold below min_commit_threshold", [*EVAL, "--model", "ck/phase_a", "--set", "commit_threshold=0.3"],
        ("min_commit_threshold: must be <= commit_threshold, got 0.5 > 0.3", "raise commit_threshold")),
    Row("a chunk wider than the phase's prefix + chunk budget", [*A, "--set", "chunk_width=64", "--out", "out/a"],
        ("chunk_width 64 leaves no prefix", "raise seq_len above chunk_width")),
    Row("a chunk wider than the held-out data", [*EVAL, "--model", "ck/phase_a", "--chunk-width", "100000"],
        ("fewer than max_prefix + chunk_width", "shorter prefixes/chunks")),
    Row("layers_to_refine beyond the model",
        ["surgery", "--model", "ck/base", "--set", "layers_to_refine=[9]", "--out", "out/s"],
        ("layer 9", "4 decoder layers")),
    Row("an unknown model preset", ["surgery", "--model", "tinyy", "--out", "out/s"],
        ("'tinyy' is neither a checkpoint folder nor a preset", "presets:")),
    Row("a checkpoint of another model type", [*EVAL, "--model", "llama"],
        ("holds a 'llama' model", "needs a Kimi-Linear checkpoint"),
        setup=write("llama/config.json", '{"model_type": "llama"}')),
    Row("a model folder without a tokenizer", [*EVAL, "--model", "notok"], ("has no tokenizer",), setup=without_tokenizer),
    Row("a surgery folder whose base is gone", [*EVAL, "--model", "lone/surgery"],
        ("references base gone/base, which does not exist", "restore the base folder"), setup=base_gone),
    Row("a data file that does not exist",
        ["train", "--phase", "pretrain", "--model", "tiny", "--set", "data=corpus.jsonl", "--out", "out/p"],
        ("data file not found: corpus.jsonl", "fix the path")),
    Row("an empty data file",
        ["train", "--phase", "pretrain", "--model", "tiny", "--set", "data=empty.txt", "--out", "out/p"],
        ("data file empty.txt is empty", "another source"), setup=write("empty.txt", "\n")),
    Row("a prompt longer than the model's context", ["generate", "--stage", "s", "--model", "ck/phase_a", "--file",
                                                    "long.txt"],
        ("the prompt is", "context of 8192 tokens", "shorten the prompt"), setup=write("long.txt", "12+34=46 " * 2000)),
    Row("--max-new-tokens 0", ["generate", "--stage", "s", "--model", "ck/phase_a", "-n", "0", "1+2="],
        ("--max-new-tokens must be >= 1",)),
    Row("eval of an unknown stage without --model", ["eval", "--stage", "phase_z"],
        ("unknown stage 'phase_z'", "pass --model")),
    Row("eval of a stage not trained yet", ["eval", "--stage", "phase_a"],
        ("no checkpoint for stage 'phase_a'", "run `rkl train --phase a` first")),
    Row("eval with recursion on, of a folder without a sidecar", [*EVAL, "--model", "ck/base", "--set",
                                                                  "recursive_enabled=true"],
        ("has no sidecar.safetensors", "recursive_enabled=false")),
    Row("--limit 0", ["eval", "--stage", "s", "--model", "ck/phase_a", "--limit", "0"], ("--limit must be >= 1",)),
    Row("an unknown --dtype", [*EVAL, "--model", "ck/phase_a", "--dtype", "fp8"], ("unknown dtype 'fp8'", "float32")),
    Row("an unknown phase", ["train", "--phase", "z"], ("unknown phase 'z'", "pretrain, vanilla, a, b, c")),
    Row("phase a with recursion off", [*A, "--set", "recursive_enabled=false", "--out", "out/a"],
        ("recursive_enabled=false", "drop that setting")),
    Row("vanilla before pretrain", ["train", "--phase", "vanilla", "--out", "out/v"],
        ("is not a checkpoint", "run `rkl train --phase pretrain` first")),
    Row("GPU out of memory in phase a (simulated)", [*A, *TINY, "--out", "out/a"],
        ("GPU out of memory in phase a", "--batch-size", "chunk_width", "max_inner_steps", "seq_len",
         "gradient_checkpointing=true"), patch=out_of_memory("rkl.train.refine_phases.RefineTask.loss")),
    Row("GPU out of memory in pretrain (simulated)", ["train", "--phase", "pretrain", "--model", "tiny", *TINY,
                                                     "--out", "out/p"],
        ("GPU out of memory in phase pretrain", "--batch-size", "seq_len", "gradient_checkpointing=true"),
        patch=out_of_memory("rkl.train.lm.LMTask.loss")),
    Row("CPU out of memory in pretrain (simulated)", ["train", "--phase", "pretrain", "--model", "tiny", *TINY,
                                                     "--out", "out/p"],
        ("out of memory in phase pretrain", "--batch-size", "seq_len"),
        patch=out_of_memory("rkl.train.lm.LMTask.loss", gpu=False)),
]


# --- running a row ---------------------------------------------------------------------------------------
def make_stages(root: Path) -> Path:
    """ck/base (one pretrain step: weights and a tokenizer), ck/surgery and ck/phase_a (one step) under root (their
    TensorBoard logs too: the runs happen in root)."""
    ck = root / "ck"
    root.mkdir(parents=True, exist_ok=True)
    (root / "configs").symlink_to(project_root() / "configs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for args in (["train", "--phase", "pretrain", "--model", "tiny", *TINY, "--out", f"{ck}/base"],
                     ["surgery", "--model", f"{ck}/base", "--out", f"{ck}/surgery", *DATA],
                     ["train", "--phase", "a", "--model", f"{ck}/surgery", *TINY, "--out", f"{ck}/phase_a"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
    return ck


def snapshot(folder: Path) -> dict[str, str]:
    files = {}
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(dirpath) / name
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def relative(text: str, work: Path) -> str:
    """The message as the README shows it: paths relative to the folder the command ran in, any pid as N, the list
    of presets (configs/models/*.json, which grows) as '...'."""
    for prefix in (str(work.resolve()), str(work)):
        text = text.replace(prefix + "/", "").replace(prefix, ".")
    text = re.sub(r"pid \d+", "pid N", text)
    return re.sub(r"\(presets: [^)]*\)", "(presets: ...)", text)


def run_row(row: Row, work: Path, stages: Path, mp: pytest.MonkeyPatch) -> tuple[int, str, str, dict, dict]:
    """(exit code, stderr, output, files before, files after) of the row's command run in `work`."""
    (work / "configs").symlink_to(project_root() / "configs")
    (work / "ck").symlink_to(stages, target_is_directory=True)
    mp.chdir(work)
    if row.setup:
        row.setup(work)
    if row.patch:
        row.patch(mp)
    before = snapshot(work)
    result = runner.invoke(app, row.args)
    return result.exit_code, result.stderr, result.output, before, snapshot(work)


def error_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1] if stderr.strip() else ""


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return make_stages(tmp_path_factory.mktemp("stages"))


@pytest.mark.parametrize("row", ROWS, ids=[r.mistake for r in ROWS])
def test_a_mistake_is_one_line_exit_2_and_touches_nothing(row, stages, tmp_path, monkeypatch):
    code, stderr, output, before, after = run_row(row, tmp_path, stages, monkeypatch)
    line = error_line(stderr)
    assert code == 2, output
    assert "Traceback" not in output and line.startswith("error: "), output
    assert sum(1 for x in stderr.splitlines() if x.startswith("error:")) == 1, stderr
    for part in row.expect:
        assert part in relative(line, tmp_path), (part, line)
    changed = [f for f, sha in before.items() if after.get(f) != sha]
    added = [f for f in after if f not in before and not f.startswith("logs/")]
    assert not changed and not added, f"changed {changed}, added {added}"
    # the README's table row is what this row prints
    readme = README.read_text()
    assert table_row(row, relative(line, tmp_path)) in readme, table_row(row, relative(line, tmp_path))


def table_row(row: Row, line: str) -> str:
    message = line.removeprefix("error: ").replace("|", "\\|")
    return f"| {row.mistake} | `{row.command}` | {message} |"


def test_the_readme_table_has_every_row_once():
    readme = README.read_text()
    table = readme[readme.index(TABLE_START):].split("\n\n")[0].splitlines()[2:]
    assert [r.split(" | ")[0].lstrip("| ") for r in table] == [r.mistake for r in ROWS]
    assert len(ROWS) >= 25


if __name__ == "__main__":  # print the README's table
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        stages_dir = make_stages(Path(tmp) / "stages")
        print(TABLE_START)
        print("|---|---|---|")
        for i, row in enumerate(ROWS):
            work = Path(tmp) / f"row{i}"
            work.mkdir()
            with pytest.MonkeyPatch.context() as mp:
                code, stderr, _, _, _ = run_row(row, work, stages_dir, mp)
            print(table_row(row, relative(error_line(stderr), work)) + ("" if code == 2 else f" (exit {code})"))
