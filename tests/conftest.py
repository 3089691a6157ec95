"""Shared fixtures. `bundle/` is on sys.path (pyproject's pytest `pythonpath`), as MONAI runs bundles;
helpers that are not fixtures live in `helpers.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import stock_sam


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Each test draws the same random inputs, whichever tests its xdist worker ran before it:
    a tolerance that fails then fails again when the test is run alone."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_sam_file(tmp_path_factory) -> Path:
    """A random `tiny` SAM saved as an official checkpoint is: a plain state dict of ``Sam``."""
    path = tmp_path_factory.mktemp("sam") / "sam_tiny_random.pth"
    torch.save(stock_sam("tiny", seed=123).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """The synthetic datasets, small: 4 training, 2 validation and 2 labelled test cases per modality."""
    from scripts.demo.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(str(root), seed=0, n_train=4, n_val=2, n_test=2)
    return root


@pytest.fixture(scope="session")
def generalist() -> Path:
    """The pretrained `tiny` generalist (built once, 2.5-5 minutes on 2 cores, then cached; `make
    test` builds it before the tests). Parallel workers (`pytest -n`) take turns: one builds it,
    the others wait for it rather than build it too."""
    import fcntl

    from scripts.demo.generalist import ensure_generalist, generalist_path

    path = generalist_path(seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".generalist.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_generalist(seed=0)
