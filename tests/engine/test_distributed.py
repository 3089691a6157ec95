"""Multi-process training with torchrun and DistributedDataParallel (gloo, 2 CPU processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import BUNDLE


def test_two_processes_keep_identical_prompts_and_write_one_model(synthetic, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).with_name("ddp_worker.py")), str(BUNDLE), str(synthetic / "microscopy"), str(tmp_path)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # an abort shows where each rank was
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    # 4 training images over 2 ranks, batch size 4: one batch of 2 per rank and epoch
    assert "rank 0 of 2: 1 batches" in done.stdout and "rank 1 of 2: 1 batches" in done.stdout
    zero, one = (torch.load(tmp_path / f"prompts_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(zero, one)
    initial = torch.load(tmp_path / "models" / "training_state.ckpt", weights_only=True)
    assert initial["epoch"] == 3
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock", "model.pt", "training_state.ckpt"]
    assert done.stderr.count("scripts.engine.handlers epoch 3/3") == 1  # the summary comes from rank 0 only
    assert done.stderr.count("prompts saved to") >= 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ptsam").experiment_id])
    assert len(runs) == 1  # tracked by rank 0 only
    losses = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert len(losses) == 3
    # each rank trained on other images; the loss logged is the step's, their mean, on both ranks
    last = [torch.load(tmp_path / f"loss_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert last[0] == last[1] and max(losses, key=lambda m: m.step).value == pytest.approx(last[0])
