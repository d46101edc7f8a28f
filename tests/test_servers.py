"""Servers bind to 127.0.0.1 unless the user asks otherwise, and asking otherwise prints a warning.

`make tensorboard` is the only server rkl starts; it runs here against a stand-in `tensorboard` that records its
arguments (a fake .venv whose install marker is up to date, so make installs nothing)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_tensorboard(tmp_path: Path, *variables: str) -> tuple[str, str]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "tensorboard"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n')
    fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: the install rule has nothing to do
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "tensorboard", f"VENV={venv}", *variables],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "args").read_text(), proc.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_tensorboard_binds_localhost_unless_told_and_warns_when_told(tmp_path):
    args, stderr = make_tensorboard(tmp_path)
    assert "--host 127.0.0.1" in args and "warning" not in stderr
    args, stderr = make_tensorboard(tmp_path / "exposed", "TB_HOST=0.0.0.0")
    assert "--host 0.0.0.0" in args and "warning: TensorBoard on 0.0.0.0:6006 has no authentication" in stderr


def test_nothing_else_listens_on_every_interface():
    """No script or module binds a server to all interfaces (0.0.0.0, TensorBoard's --bind_all)."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("src", "scripts") for p in (ROOT / folder).rglob("*")
            if p.is_file() and p.suffix in (".py", ".sh")
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if re.search(r"0\.0\.0\.0|--bind_all|bind_all=True", line)]
    assert not hits, hits
