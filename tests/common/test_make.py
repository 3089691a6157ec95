"""The Makefile's set-up: a changed TORCH_SPEC reinstalls torch in an existing environment."""

from __future__ import annotations

import subprocess

import pytest

from helpers import REPO


def _dry_run(*args: str) -> str:
    done = subprocess.run(
        ["make", "-n", *args], cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_another_torch_spec_reinstalls_torch():
    stamp = REPO / ".venv" / ".installed"
    if not stamp.is_file() or stamp.stat().st_mtime < (REPO / "pyproject.toml").stat().st_mtime:
        pytest.skip("not run from `make test`'s own .venv, or pyproject.toml changed since its set-up")
    commands = _dry_run("setup", "TORCH_SPEC=torch==2.9.1")
    assert 'pip install -q --disable-pip-version-check "torch==2.9.1"' in commands
    assert 'setup_env.sh .venv-label "torch==2.9.1"' in _dry_run("label-setup", "TORCH_SPEC=torch==2.9.1")
    assert "pip install" not in _dry_run("setup")  # the spec it was set up with: nothing to do
