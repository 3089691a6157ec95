"""Shared fixtures. `bundle/` is on sys.path (pyproject's pytest `pythonpath`), as MONAI runs bundles."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from scripts.sam import build_sam, get_variant, random_sam_weights

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"


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


@pytest.fixture(scope="session")
def tiny_sam_file(tmp_path_factory) -> Path:
    """A random `tiny` SAM saved as an official checkpoint is: a plain state dict of ``Sam``."""
    path = tmp_path_factory.mktemp("sam") / "sam_tiny_random.pth"
    torch.save(stock_sam("tiny", seed=123).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """The synthetic datasets, small: 4 training and 2 validation cases per modality."""
    from scripts.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), seed=0, n_train=4, n_val=2)
    return root


@pytest.fixture(scope="session")
def generalist() -> Path:
    """The pretrained `tiny` generalist (built once, about 2.5 minutes on 2 cores, then cached)."""
    from scripts.generalist import ensure_generalist

    return ensure_generalist(seed=0)


def monai_bundle(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ...`` from the bundle folder, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "monai.bundle", *args],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )
