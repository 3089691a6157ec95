"""Where the demo's generalist is cached: the PTSAM cache (``cache_root``), for the tests, the
demo and `make test`'s ``python -m scripts.demo.generalist`` alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import BUNDLE
from scripts.common.files import cache_root
from scripts.demo.generalist import generalist_path


def test_the_generalist_is_cached_in_the_ptsam_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PTSAM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert generalist_path().parent == cache_root() == tmp_path / "home" / ".cache" / "ptsam"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert generalist_path().parent == cache_root() == tmp_path / "xdg" / "ptsam"
    monkeypatch.setenv("PTSAM_CACHE_DIR", str(tmp_path / "ptsam"))
    assert generalist_path().parent == cache_root() == tmp_path / "ptsam"


def test_make_tests_command_finds_the_file_the_tests_use(tmp_path, monkeypatch):
    # `cd bundle && python -m scripts.demo.generalist`, as `make test` runs it before the tests:
    # it must name (and so build) the file the tests' fixture asks generalist_path for.
    monkeypatch.delenv("PTSAM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cached = generalist_path(seed=0)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stand-in")  # there already: nothing is trained
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "scripts.demo.generalist"],
        cwd=BUNDLE, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == cached and cached.read_bytes() == b"stand-in"
