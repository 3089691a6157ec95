"""benchmarks/gpu.py as a lent GPU will run it, on a CPU with `tiny`: a device lease is minutes, so
the harness must work the first time. Its times mean nothing here; what each section computes and
checks (agreement, batching, the study's cells) must hold."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_gpu_bench_sections_run_on_a_cpu(tmp_path):
    env = {
        **os.environ,
        "BENCH_DEVICE": "cpu",
        "BENCH_VARIANTS": "tiny",
        "BENCH_SECTIONS": "volume,training,study",
        "BENCH_VOLUME_SLICES": "4",
        "BENCH_VOLUME_BATCHES": "1,4",
        "BENCH_E2E_VARIANTS": "tiny",
        "BENCH_TRAIN_BATCHES": "1,2",
        "BENCH_STUDY_VARIANT": "tiny",
        "BENCH_STUDY_SHOTS": "1,2",
        "BENCH_STUDY_EPOCHS": "1",
        "BENCH_REPEATS": "1",
        "BENCH_OUT": str(tmp_path / "bench-gpu.json"),
    }
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",  # progress bars
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert report["device"].startswith("CPU")

    volume = report["volume_tiny"]
    # The baseline is SAM's own prompt-free output, and batching slices changes nothing in fp32.
    assert volume["volume_stock_rel_error_vs_promptless"] < 1e-4
    assert volume["volume_fp32_batched_rel_error"] < 1e-5
    assert volume["volume_best_batch"] in (1, 4)
    for key in ("volume_slices_per_s_stock_fp32", "volume_slices_per_s_amp_b1", "volume_slices_per_s_amp_b4"):
        assert volume[key] > 0, key
    assert 0 <= volume["volume_amp_mask_dice_vs_fp32"] <= 1
    assert volume["volume_e2e_s_amp"] > 0 and volume["volume_e2e_s_stock_fp32"] > 0

    training = report["training_tiny"]
    names = [f"{s}_{p}" for s in ("md", "md_ie") for p in ("fp32", "amp")]
    expected = {f"train_ms_{n}_b{b}" for n in names for b in (1, 2)}
    expected |= {f"train_ms_md_ie_nockpt_{p}_b1" for p in ("fp32", "amp")}
    assert {k for k in training if k.startswith("train_ms_")} == expected
    assert all(math.isfinite(training[k]) and training[k] > 0 for k in expected)
    assert all(math.isnan(v) for k, v in training.items() if k.startswith("train_peak_gib_"))  # GPU memory only

    study = report["study_tiny"]
    cells = {f"shots{s}_md8_{t}_seed0" for s in (1, 2) for t in ("ie0", "ie8", "decoder")}
    assert {k.removeprefix("study_s_per_epoch_") for k in study if k.startswith("study_s_per_epoch_")} == cells
    assert study["study_cells"] == 6 and study["study_csv_rows"] == 6
    assert all(study[f"study_s_{c}"] > 0 for c in cells)
