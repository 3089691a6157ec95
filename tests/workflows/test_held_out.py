"""Evaluation scores as held out only images that neither trained nor chose the prompts: model.pt
records its split, and an evaluation whose own split would score those images is refused."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from helpers import BUNDLE, monai_bundle, quiet
from scripts.common.errors import chain
from scripts.data.datasets import held_out, load_datalist
from scripts.engine.splits import HeldOutError
from scripts.model.network import PTSAM
from scripts.model.prompt_file import SPLIT_KEY, load_prompts, read_split

EVALUATE = "['configs/train.yaml','configs/evaluate.yaml']"


def _copy_cases(synthetic: Path, data: Path, n: int = 7) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
        for i in range(n):
            shutil.copy(synthetic / "microscopy" / sub / f"cells_{i:03d}.tif", data / sub)


@pytest.fixture(scope="module")
def model(synthetic, tmp_path_factory) -> tuple[Path, Path]:
    """(folder, ckpt_dir): seven cases in imagesTr/ + labelsTr/, no dataset.json, and a `tiny`
    model trained one epoch on them with the default fractions: 1 test, 1 validation, 5 training."""
    root = tmp_path_factory.mktemp("held_out")
    _copy_cases(synthetic, root / "data")
    done = monai_bundle(
        "run", "training", "--config_file", "configs/train.yaml", "--sam_variant", "tiny", "--epochs", "1",
        "--dataset_dir", str(root / "data"), "--output_dir", str(root / "eval"), "--ckpt_dir", str(root / "models"),
        "--tracking_enabled", "false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "data", root / "models"


def _evaluate(data: Path, models: Path, out: Path, *extra: str):
    return monai_bundle(
        "run", "evaluating", "--config_file", EVALUATE, "--sam_variant", "tiny", "--dataset_dir", str(data),
        "--ckpt_dir", str(models), "--output_dir", str(out), "--tracking_enabled", "false", "--n_overlays", "0", *extra,
    )  # fmt: skip


def _names(items) -> set[str]:
    return {Path(i["image"]).name for i in items}


def test_model_pt_records_which_images_trained_and_chose_the_prompts(model):
    data, models = model
    split = read_split(models / "model.pt")
    assert {n for n, _ in split["training"]} == {f"imagesTr/{n}" for n in _names(load_datalist(data, "training"))}
    assert {n for n, _ in split["validation"]} == {f"imagesTr/{n}" for n in _names(load_datalist(data, "validation"))}
    assert (split["test_fraction"], split["val_fraction"], len(split["training"]), len(split["validation"])) == (
        0.2, 0.2, 5, 1,
    )  # fmt: skip
    assert split["split_group"] is None  # train.yaml's default, recorded


def test_another_test_fraction_is_refused_naming_the_images(model, tmp_path):
    data, models = model
    trained, chose = load_datalist(data, "training"), load_datalist(data, "validation")
    wider = load_datalist(data, "test", test_fraction=0.5)  # 4 "test" images: 3 trained or chose the prompts
    leaked = _names(wider) - _names(load_datalist(data, "test"))
    assert len(leaked) == 3
    done = _evaluate(data, models, tmp_path / "eval", "--test_fraction", "0.5")
    assert done.returncode != 0 and not (tmp_path / "eval" / "metrics.csv").exists()
    assert "evaluation refused: 3 of the 4 test image(s) to score trained or chose the prompts" in done.stderr
    for item in wider:
        name = Path(item["image"]).name
        role = "a training image" if name in _names(trained) else "a validation image"
        assert (f"{item['image']}: {role}" in done.stderr) == (name in leaked)
    assert "trained with test_fraction=0.2, val_fraction=0.2; this run asks for test_fraction=0.5" in done.stderr
    # the validation section still evaluates, and says how many of its images trained or chose the prompts
    done = _evaluate(data, models, tmp_path / "val", "--test_fraction", "0.5", "--eval_section", "validation")
    assert done.returncode == 0, done.stderr[-3000:]
    scored = load_datalist(data, "validation", test_fraction=0.5)
    rows = list(csv.DictReader(open(tmp_path / "val" / "metrics.csv")))
    assert {Path(r["image"]).name for r in rows} == _names(scored) and {r["split"] for r in rows} == {"validation"}
    n_trained, n_chose = len(_names(scored) & _names(trained)), len(_names(scored) & _names(chose))
    assert (
        f"of the {len(scored)} validation image(s) scored, {n_trained} trained the prompts in {models / 'model.pt'}, "
        f"{n_chose} chose them, {len(scored) - n_trained - n_chose} neither"
    ) in done.stdout + done.stderr


def _grown(synthetic: Path, data: Path, into: Path, new_is_held_out: bool) -> tuple[Path, str]:
    """``data`` and one more image (cells_007), named so that the test split of the grown folder
    (two images now) is the old test image and the new one, or the old test image and another."""
    old_test = _names(load_datalist(data, "test"))
    names = [{"image": p.name} for p in (data / "imagesTr").iterdir()]
    for k in range(1000):
        name = f"added_{k:03d}.tif"
        test = _names(held_out([*names, {"image": name}], 0.2, salt="test:")[1])
        if old_test < test and (name in test) == new_is_held_out:
            break
    shutil.copytree(data, into)
    for sub in ("imagesTr", "labelsTr"):
        shutil.copy(synthetic / "microscopy" / sub / "cells_007.tif", into / sub / name)
    return into, name


def test_an_image_added_to_the_folder(synthetic, model, tmp_path):
    data, models = model
    old_test = _names(load_datalist(data, "test"))
    # the grown folder's test split: the old test image and the new one, neither seen by the prompts
    grown, name = _grown(synthetic, data, tmp_path / "grown", new_is_held_out=True)
    done = _evaluate(grown, models, tmp_path / "eval")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert {Path(r["image"]).name for r in rows} == old_test | {name}
    assert "of the 2 test image(s) scored, 0 trained the prompts" in done.stdout + done.stderr
    # ... or the old test image and one that trained or chose the prompts: refused, named
    grown, name = _grown(synthetic, data, tmp_path / "grown2", new_is_held_out=False)
    leaked = _names(load_datalist(grown, "test")) - old_test
    done = _evaluate(grown, models, tmp_path / "eval2")
    assert done.returncode != 0 and not (tmp_path / "eval2" / "metrics.csv").exists()
    assert "1 of the 2 test image(s)" in done.stderr and f"imagesTr/{leaked.pop()}: a " in done.stderr
    assert "the folder's images changed since training" in done.stderr


def _tags(models: Path, data: Path, caplog) -> dict:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "evaluate.yaml")])
    parser.update(
        {"bundle_root": str(BUNDLE), "sam_variant": "tiny", "ckpt_dir": str(models), "dataset_dir": str(data)}
    )
    with caplog.at_level(logging.INFO):
        return parser.get_parsed_content("eval_tracking_run#tags")


def test_a_model_pt_without_a_record_is_evaluated_with_a_note(model, tmp_path, caplog):
    data, models = model
    assert _tags(models, data, caplog) == {"eval_split": "test", "split_check": "checked"}
    assert "of the 1 test image(s) scored, 0 trained the prompts" in caplog.text
    old = tmp_path / "models" / "model.pt"  # as an older bundle wrote it (or a federated global model)
    old.parent.mkdir()
    state = torch.load(models / "model.pt", weights_only=True)
    del state[SPLIT_KEY]
    torch.save(state, old)
    load_prompts(quiet(PTSAM, "tiny"), old)
    caplog.clear()
    assert _tags(old.parent, data, caplog) == {"eval_split": "test", "split_check": "unchecked"}
    assert f"{old} records no split" in caplog.text and "cannot be checked" in caplog.text


def test_evaluation_splits_and_checks_with_its_own_split_group(model, tmp_path):
    # the knob as typed on the command line reaches evaluation's split ...
    data, models = model
    done = _evaluate(data, models, tmp_path / "one", "--split_group", "^(cells)_")  # all seven one patient
    assert done.returncode != 0 and not (tmp_path / "one").exists()
    assert "test_fraction=0.2: the 7 images to split form one group" in done.stderr
    assert "split_group 'cells' for 7" in done.stderr
    # ... and its check against the record, which says that the knob differs from training's
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "evaluate.yaml")])
    parser.update(
        {"bundle_root": str(BUNDLE), "sam_variant": "tiny", "ckpt_dir": str(models), "dataset_dir": str(data)}
        | {"test_fraction": 0.5, "split_group": r"^(cells_\d+)"}
    )
    with pytest.raises(RuntimeError) as raised:  # MONAI's "Failed to evaluate", from ours
        parser.get_parsed_content("split_check")
    refusal = str(next(e for e in chain(raised.value) if isinstance(e, HeldOutError)))
    assert "evaluation refused: 3 of the 4 test image(s)" in refusal
    assert (
        "trained with test_fraction=0.2, val_fraction=0.2, split_group=None; this run asks for "
        r"test_fraction=0.5, val_fraction=0.2, split_group='^(cells_\\d+)'"
    ) in refusal
