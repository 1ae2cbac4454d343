"""The installed commands: ``make`` puts ``comfy-dual`` and ``comfy-submit`` beside the
virtualenv's python, and they run without activating it."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
SCRIPTS = {"comfy-dual": "usage: daemon.py", "comfy-submit": "usage: submit.py"}


def test_pyproject_names_both_commands() -> None:
    scripts = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"comfy-dual": "daemon:main", "comfy-submit": "submit:main"}


@pytest.mark.parametrize(("name", "usage"), SCRIPTS.items())
def test_the_installed_command_runs_from_anywhere_without_activation(
        name: str, usage: str, tmp_path: Path) -> None:
    command = Path(sys.executable).parent / name
    if not command.exists():
        pytest.skip(f"{name} is not installed beside {sys.executable}: run `make` first")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    done = subprocess.run([str(command), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage)
