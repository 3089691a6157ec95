"""What tests share besides fixtures: the repository's paths, quiet construction, stock SAM,
and running `python -m monai.bundle` as a user does. (`tests/` is on sys.path: pyproject.)"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from scripts.model.sam import build_sam, get_variant, random_sam_weights

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
RESOURCES = Path(__file__).resolve().parent / "resources"


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with the random-weights / not-a-real-model warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def stock_sam(variant: str = "tiny", seed: int = 0) -> torch.nn.Module:
    """segment-anything's own ``Sam`` with seeded random weights."""
    sam = build_sam(get_variant(variant))
    random_sam_weights(sam, seed)
    return sam


def monai_bundle(*args: str, timeout: int = 600, cwd: Path = BUNDLE) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ...`` from the bundle folder (or ``cwd``), as a user runs it."""
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "monai.bundle", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )


def training_until_first_epoch(args: list[str], state: Path) -> subprocess.Popen:
    """``python -m monai.bundle run training *args`` in the background, returned once it has saved
    its first epoch to ``state`` (or ended, or 300 s passed)."""
    command = [sys.executable, "-W", "ignore", "-m", "monai.bundle", "run", "training", *args]
    proc = subprocess.Popen(command, cwd=BUNDLE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc


def bf16_units() -> bool:
    """Whether OpenVINO finds bfloat16 units on this CPU, asked directly (not through the bundle's
    check, which the tests hold against it): the bfloat16 tests run where it does, and test the
    refusal elsewhere."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
