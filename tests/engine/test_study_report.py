"""The study's summary: image-encoder tokens' gain over MD only, paired by shots and MD tokens; peak GPU memory."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from PIL import Image

from scripts.engine.study_report import ie_gains, summarize, write_csv, write_plots


def _cell(setting: str, shots: int, md: int, ie: int, dice: float, seed: int) -> dict:
    tune = "decoder" if setting == "decoder" else "prompts"
    return {
        "setting": setting, "tune": tune, "shots": shots, "n_md_prompts": md, "n_ie_prompts": ie,
        "trainable_parameters": 2048 * md // 8 + 768 * ie, "test_dice": dice, "val_dice": dice, "seconds": 1.0,
        "seed": seed,
    }  # fmt: skip


def test_ie_gain_pairs_each_md_ie_row_with_its_md_only_row(tmp_path):
    cells = [
        _cell("MD", 2, 8, 0, 0.60, 0), _cell("MD", 2, 8, 0, 0.70, 1),
        _cell("MD+IE", 2, 8, 8, 0.80, 0), _cell("MD+IE", 2, 8, 8, 0.80, 1),
        _cell("MD", 8, 8, 0, 0.90, 0), _cell("MD", 8, 8, 0, 0.90, 1),
        _cell("MD+IE", 8, 8, 8, 0.85, 0), _cell("MD+IE", 8, 8, 8, 0.87, 1),
        _cell("MD+IE", 8, 4, 8, 0.95, 0),  # no MD-only row with 4 tokens: nothing to pair with
        _cell("decoder", 8, 8, 0, 0.99, 0),
    ]  # fmt: skip
    gains = {(g["shots"], g["n_md_prompts"]): g for g in ie_gains(summarize(cells))}
    assert set(gains) == {(2, 8), (8, 8)}
    assert gains[2, 8]["gain"] == pytest.approx(0.80 - 0.65)
    assert gains[8, 8]["gain"] == pytest.approx(0.86 - 0.90)  # IE tokens may also cost
    # the s.e. of a difference of two means over 2 seeds each, sqrt(s1^2 / 2 + s2^2 / 2); one row has s = 0
    assert gains[2, 8]["gain_se"] == pytest.approx(math.sqrt(statistics.variance([0.60, 0.70]) / 2))
    assert gains[8, 8]["gain_se"] == pytest.approx(math.sqrt(statistics.variance([0.85, 0.87]) / 2))

    plots = write_plots(summarize(cells), tmp_path / "plots")
    assert [p.name for p in plots] == [
        "dice_vs_shots.png", "dice_vs_tokens.png", "parameters_vs_dice.png", "ie_gain_vs_shots.png",
    ]  # fmt: skip
    with Image.open(plots[-1]) as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 100

    md_only = [c for c in cells if c["setting"] != "MD+IE"]  # nothing to pair: no gain plot
    assert ie_gains(summarize(md_only)) == []
    assert [p.name for p in write_plots(summarize(md_only), tmp_path / "md_only")][-1] == "parameters_vs_dice.png"
    assert sorted(p.name for p in (tmp_path / "md_only").iterdir()) == [
        "dice_vs_shots.png", "dice_vs_tokens.png", "parameters_vs_dice.png",
    ]  # fmt: skip


def test_peak_gpu_memory_is_the_largest_over_seeds_and_empty_off_a_gpu(tmp_path):
    gpu = [_cell("MD", 4, 8, 0, 0.8, s) | {"peak_gpu_gib": peak} for s, peak in enumerate((1.5, 2.25))]
    cpu = [_cell("MD", 8, 8, 0, 0.9, 0) | {"peak_gpu_gib": None}, _cell("MD", 8, 8, 0, 0.9, 1)]  # older: no key
    rows = {r["shots"]: r for r in summarize(gpu + cpu)}
    assert rows[4]["peak_gpu_gib_max"] == 2.25
    assert rows[8]["peak_gpu_gib_max"] is None
    path = write_csv(summarize(gpu + cpu), tmp_path / "study.csv")
    with path.open(newline="") as f:
        assert [r["peak_gpu_gib_max"] for r in csv.DictReader(f)] == ["2.2500", ""]
