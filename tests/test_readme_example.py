"""The README's Python API example, executed as written on a tiny phase A checkpoint: it runs, uses only what
`from rkl import ...` exposes, and prints what `rkl generate` prints for the same prompt."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from rkl.cli import app
from rkl.paths import project_root


def readme_example() -> str:
    """The first ```python block of the README's "## Python API" section."""
    readme = (project_root() / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_and_agrees_with_rkl_generate(tiny_stages, tmp_path, monkeypatch, capsys):
    code = readme_example()
    imports = re.findall(r"^from (\S+) import", code, re.M)
    assert imports == ["rkl"], imports  # the example needs nothing but the package's top level
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "phase_a").symlink_to(tiny_stages / "phase_a")
    (tmp_path / "configs").symlink_to(project_root() / "configs")  # tmp_path is now the project root
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    printed = capsys.readouterr().out
    generation, traces = printed.split("\nchunk 1: ", 1)
    assert re.fullmatch(r"(chunk \d+: \d+ steps, p_commit \[[0-9., ]+\], committed .*\n)+", "chunk 1: " + traces)
    assert namespace["base_only"].enabled is False and namespace["wrapper"].enabled is True
    cli = CliRunner().invoke(app, ["generate", "--stage", "phase_a", "-n", "8", "347+685="], env={"COLUMNS": "200"})
    assert cli.exit_code == 0, cli.output
    assert cli.stdout == "347+685=" + generation + "\n"
