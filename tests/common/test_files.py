"""Working folders that say whether the process using them is alive: what a killed run leaves is
removed, what a running one uses is kept (MONAI Label's /train stages its prompts in one)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import BUNDLE
from scripts.common.files import held_folder, release_folder, remove_unheld

HOLD = (
    "import sys, time; from scripts.common.files import held_folder; "
    "print(held_folder(sys.argv[1], '.work-')[0], flush=True); time.sleep(120)"
)


def test_only_folders_no_live_process_holds_are_removed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        running = tmp_path / os.path.basename(proc.stdout.readline().strip())
        assert running.name.startswith(".work-") and running.is_dir()
        old = tmp_path / ".work-old"  # left by a bundle from before the folders were held
        (old / "sub").mkdir(parents=True)
        (old / "sub" / "model.pt").write_bytes(b"prompts")
        (tmp_path / "other").mkdir()
        mine, fd = held_folder(tmp_path, ".work-")  # this process's own: in use too
        assert remove_unheld(tmp_path, ".work-") == [old]
        assert running.is_dir() and mine.is_dir() and (tmp_path / "other").is_dir()
        proc.kill()  # as MONAI Label stops a training (DELETE /train): SIGKILL
        proc.wait()
        assert remove_unheld(tmp_path, ".work-") == [running] and not running.exists()
        release_folder(mine, fd)
        assert not mine.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other"]
        assert remove_unheld(tmp_path / "missing", ".work-") == []
    finally:
        proc.kill()
        proc.wait()
