"""What a run refuses before any work, and how it says so: wrong options, unwritable folders, a
training state that cannot be read, a second training into the same folder; the bundle's own
message is the last line printed, the traceback only with PTSAM_DEBUG=1."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import sys

import pytest

from helpers import BUNDLE, monai_bundle, training_until_first_epoch

TRAIN = "configs/train.yaml"
INFERENCE = "configs/inference.yaml"


def _train(synthetic, tmp_path, *extra: str, env: dict | None = None):
    args = ["run", "training", "--config_file", TRAIN, "--sam_variant", "tiny"]
    args += ["--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(tmp_path / "eval")]
    args += ["--ckpt_dir", str(tmp_path / "models"), *extra]
    if env is None:
        return monai_bundle(*args)
    command = [sys.executable, "-W", "ignore", "-m", "monai.bundle", *args]
    return subprocess.run(
        command,
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env={**os.environ, **env},
    )


def _last_lines(done: subprocess.CompletedProcess, n: int = 1) -> list[str]:
    return done.stderr.strip().splitlines()[-n:]


def test_wrong_options_are_named_with_what_is_allowed(synthetic, tmp_path):
    done = _train(synthetic, tmp_path, "--epochs", "abc", "--learning_rate", "-1", "--intensity", "ct")
    assert done.returncode != 0
    assert _last_lines(done, 4) == [
        "Error: invalid option(s):",
        "  --epochs 'abc': expected an integer >= 1",
        "  --learning_rate -1: expected a number >= 0",
        "  --intensity 'ct': expected one of auto, window, percentile, none",
    ]
    assert "Traceback" not in done.stderr and "ConfigExpression" not in done.stderr
    assert not (tmp_path / "eval").exists()  # refused before any folder or data was touched

    done = _train(synthetic, tmp_path, "--n_md_prompts", "0")
    message = "  --n_md_prompts 0 with --n_ie_prompts 0: no prompt tokens, nothing to learn or apply"
    assert _last_lines(done) == [message]


def test_the_traceback_is_there_with_the_debug_switch(synthetic, tmp_path):
    done = _train(synthetic, tmp_path, "--epochs", "0", env={"PTSAM_DEBUG": "1"})
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "Failed to evaluate ConfigExpression" in done.stderr
    assert _last_lines(done) == ["  --epochs 0: expected an integer >= 1"]  # still the last line


def test_inference_options_too(synthetic, tmp_path):
    done = monai_bundle(
        "run", "inference", "--config_file", INFERENCE, "--sam_variant", "tiny", "--batch_size", "2.5",
        "--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert _last_lines(done) == ["  --batch_size 2.5: expected an integer >= 1"]


@pytest.mark.parametrize("knob", ["ckpt_dir", "output_dir"])
def test_an_unwritable_folder_is_refused_before_any_data_is_read(synthetic, tmp_path, knob):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = _train(synthetic, tmp_path, f"--{knob}", str(blocker / "sub"))
    assert done.returncode != 0
    assert _last_lines(done)[0].startswith(f"Error: {knob}={blocker / 'sub'}: cannot write there")
    assert "epoch" not in done.stdout and not (tmp_path / "models" / "model.pt").exists()


def test_inference_into_an_unwritable_folder_is_refused_up_front(synthetic, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = monai_bundle(
        "run", "inference", "--config_file", INFERENCE, "--sam_variant", "tiny",
        "--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(blocker / "out"),
    )  # fmt: skip
    assert done.returncode != 0 and _last_lines(done)[0].startswith(f"Error: output_dir={blocker / 'out'}:")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("content", ["truncated", "pickle"])
def test_an_unreadable_training_state_is_named_with_what_to_do(synthetic, tmp_path, content):
    state = tmp_path / "models" / "training_state.ckpt"
    state.parent.mkdir()
    state.write_bytes(b"PK\x03\x04 cut short" if content == "truncated" else pickle.dumps(_Payload()))
    done = _train(synthetic, tmp_path, "--epochs", "1")
    assert done.returncode != 0
    reason = "truncated or not a PyTorch file" if content == "truncated" else "it holds Python objects"
    (line,) = _last_lines(done)
    assert line.startswith(f"Error: {state}: cannot resume from this training state ({reason}")
    assert "--resume false" in line and "weights_only=False" not in done.stderr
    assert not (BUNDLE / "PWNED").exists() and not (tmp_path / "models" / "model.pt").exists()
    restarted = _train(synthetic, tmp_path, "--epochs", "1", "--resume", "false")
    assert restarted.returncode == 0, restarted.stderr[-3000:]


def test_a_second_training_into_the_same_folder_refuses(synthetic, tmp_path):
    args = ["--config_file", TRAIN, "--sam_variant", "tiny", "--dataset_dir", str(synthetic / "microscopy")]
    args += ["--output_dir", str(tmp_path / "eval"), "--ckpt_dir", str(tmp_path / "models"), "--epochs", "300"]
    args += ["--early_stop_patience", "0"]
    first = training_until_first_epoch(args, tmp_path / "models" / "training_state.ckpt")
    try:
        assert first.poll() is None, "the first training must still run"
        second = monai_bundle("run", "training", *args[:-4], "--epochs", "1")
        assert second.returncode != 0
        (line,) = _last_lines(second)
        assert line.startswith(f"Error: {tmp_path / 'models'} is in use by a training still running (process ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed, it leaves no stale lock: the same command now runs (and resumes)
    again = monai_bundle("run", "training", *args[:-4], "--epochs", "2")
    assert again.returncode == 0, again.stderr[-3000:]


def test_written_files_take_the_umask_mode(synthetic, tmp_path):
    old = os.umask(0o022)
    try:
        done = _train(synthetic, tmp_path, "--epochs", "1")
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in (tmp_path / "models" / "model.pt", tmp_path / "models" / "training_state.ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
