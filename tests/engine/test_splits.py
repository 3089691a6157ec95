"""model.pt's record of its split: which images trained the prompts and which chose them, by
content; evaluation refuses to score them as held-out test images."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import quiet
from scripts.demo.synthetic import ct_affine, ct_case, write_dicom_series
from scripts.engine.splits import HeldOutError, check_evaluation, comparison_images, image_id, record
from scripts.model.network import PTSAM
from scripts.model.prompt_file import SPLIT_KEY, load_prompts, read_split, save_prompts


def _png(path: Path, seed: int) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 40)).astype(np.uint8)).save(path)
    return {"image": str(path), "label": str(path)}  # the label plays no part here


@pytest.fixture
def folder(tmp_path) -> dict[str, list[dict]]:
    """Six images of a dataset folder: four trained the prompts, one chose them, one is held out."""
    cases = [_png(tmp_path / "data" / "imagesTr" / f"case{i}.png", seed=i) for i in range(6)]
    return {"training": cases[:4], "validation": cases[4:5], "test": cases[5:]}


def _model(tmp_path: Path, split: dict | None) -> Path:
    return save_prompts(quiet(PTSAM, "tiny"), tmp_path / "models" / "model.pt", split=split)


def test_an_image_is_known_by_its_content(tmp_path):
    a, b = _png(tmp_path / "a.png", seed=0)["image"], _png(tmp_path / "b.png", seed=1)["image"]
    copy = tmp_path / "elsewhere" / "renamed.png"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    assert image_id(a) == image_id(copy) != image_id(b)
    assert image_id(tmp_path / "missing.png") is None  # the dataset check names such files
    image, _ = ct_case(np.random.default_rng(0))
    write_dicom_series(image, ct_affine(np.random.default_rng(0)), tmp_path / "series", seed=0)
    series = image_id(tmp_path / "series")
    assert series.startswith("dicom:1.") and image_id(f"{tmp_path / 'series'}::{series[6:]}") == series


def test_the_record_travels_in_model_pt(tmp_path, folder):
    split = record(tmp_path / "data", folder["training"], folder["validation"], 0.2, 0.1)
    path = _model(tmp_path, split)
    saved = read_split(path)
    assert [name for name, _ in saved["training"]] == [f"imagesTr/case{i}.png" for i in range(4)]
    assert [name for name, _ in saved["validation"]] == ["imagesTr/case4.png"]
    assert (saved["val_fraction"], saved["test_fraction"], saved["notes"]) == (0.2, 0.1, [])
    assert len(torch.load(path, weights_only=True)[SPLIT_KEY]) < 2000  # small: names and digests
    load_prompts(quiet(PTSAM, "tiny"), path)  # not a weight: a strict load works


def test_test_images_that_trained_or_chose_the_prompts_are_refused(tmp_path, folder):
    path = _model(tmp_path, record(tmp_path / "data", folder["training"], folder["validation"], 0.2, 0.1))
    assert check_evaluation(path, folder["test"], "test", 0.2, 0.1)["status"] == "checked"
    leaked = folder["test"] + folder["validation"] + folder["training"][:1]
    with pytest.raises(HeldOutError) as err:
        check_evaluation(path, leaked, "test", 0.2, 0.3)
    message = str(err.value)
    assert "2 of the 3 test image(s)" in message and "case5.png:" not in message
    assert f"{folder['validation'][0]['image']}: a validation image (it chose the prompts" in message
    assert f"{folder['training'][0]['image']}: a training image (it trained the prompts)" in message
    assert "trained with test_fraction=0.1, val_fraction=0.2; this run asks for test_fraction=0.3" in message
    # the same image under another name, in another folder, is the same image
    copy = tmp_path / "other" / "imagesTs" / "new.png"
    copy.parent.mkdir(parents=True)
    shutil.copy(folder["training"][2]["image"], copy)
    with pytest.raises(HeldOutError, match=r"new.png: a training image .* recorded as imagesTr/case2.png"):
        check_evaluation(path, [{"image": str(copy)}], "test", 0.2, 0.1)
    with pytest.raises(HeldOutError, match="the folder's images changed since training"):
        check_evaluation(path, [{"image": str(copy)}], "test", 0.2, 0.1)


def test_validation_and_training_sections_say_what_they_score(tmp_path, folder, caplog):
    path = _model(tmp_path, record(tmp_path / "data", folder["training"], folder["validation"], 0.2, 0.1))
    with caplog.at_level(logging.INFO):
        found = check_evaluation(path, folder["validation"], "validation", 0.2, 0.1)
    assert found["status"] == "checked"
    assert "of the 1 validation image(s) scored, 0 trained the prompts" in found["detail"]
    assert "1 chose them, 0 neither" in found["detail"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # another val_fraction: some "validation" images trained the prompts
        found = check_evaluation(path, folder["validation"] + folder["training"][:2], "validation", 0.5, 0.1)
    assert "2 trained the prompts" in found["detail"] and "2 trained the prompts" in caplog.text


def test_a_model_without_a_record_is_evaluated_with_a_warning(tmp_path, folder, caplog):
    path = _model(tmp_path, None)  # an older bundle's model.pt, or a federated global model
    assert read_split(path) is None
    with caplog.at_level(logging.WARNING):
        found = check_evaluation(path, folder["training"], "test", 0.2, 0.2)
    assert found["status"] == "unchecked" and "records no split" in caplog.text and "cannot be checked" in caplog.text
    assert check_evaluation(tmp_path / "none.pt", folder["test"], "test", 0.2, 0.2)["status"] == "no model"


def test_continued_prompts_keep_the_images_of_the_earlier_record(tmp_path, folder):
    """MONAI Label trains from the previous model.pt: what trained those prompts trained these."""
    first = _model(tmp_path, record(tmp_path / "data", folder["training"][:2], [], 0.2, 0.2))
    later = record(tmp_path / "data", folder["training"][2:], folder["validation"], 0.2, 0.2, started_from=first)
    assert [n for n, _ in later["training"]] == [f"imagesTr/case{i}.png" for i in (2, 3, 0, 1)]
    path = save_prompts(quiet(PTSAM, "tiny"), tmp_path / "later.pt", split=later)
    with pytest.raises(HeldOutError, match="case0.png: a training image"):
        check_evaluation(path, folder["training"][:1], "test", 0.2, 0.2)
    # continued from a file without a record: what it learned from is unknown, and the record says so
    unknown = record(tmp_path / "data", folder["training"], [], 0.2, 0.2, started_from=_model(tmp_path, None))
    assert unknown["notes"] and "records no split" in unknown["notes"][0]
    path = save_prompts(quiet(PTSAM, "tiny"), tmp_path / "partial.pt", split=unknown)
    assert check_evaluation(path, folder["test"], "test", 0.2, 0.2)["status"] == "partial"


def test_the_record_keeps_split_group_and_the_refusal_names_it(tmp_path, folder):
    """Evaluation rebuilds the split from its own split_group, as from its fractions: another one
    (or none) moves images into `test`, and the refusal says which setting differs."""
    grouped = record(tmp_path / "data", folder["training"], folder["validation"], 0.2, 0.1, split_group=r"^(case\d)")
    path = _model(tmp_path, grouped)
    assert read_split(path)["split_group"] == r"^(case\d)"
    assert record(tmp_path / "data", folder["training"], [], 0.2, 0.1)["split_group"] is None
    with pytest.raises(HeldOutError) as err:
        check_evaluation(path, folder["training"][:1], "test", 0.2, 0.1)
    assert (
        r"trained with test_fraction=0.1, val_fraction=0.2, split_group='^(case\\d)'; this run asks for "
        "test_fraction=0.1, val_fraction=0.2, split_group=None, which carves another test split" in str(err.value)
    )
    assert check_evaluation(path, folder["test"], "test", 0.2, 0.1, r"^(case\d)")["status"] == "checked"
    # a record from before groups: its split may differ from today's for that alone, which is said
    before_groups = {k: v for k, v in grouped.items() if k != "split_group"}
    older = save_prompts(quiet(PTSAM, "tiny"), tmp_path / "older.pt", split=before_groups)
    with pytest.raises(HeldOutError, match="trained by an earlier bundle, whose split did not keep a case's"):
        check_evaluation(older, folder["training"][:1], "test", 0.2, 0.1)


def test_a_comparison_holds_out_validation_images_neither_prompts_saw(tmp_path, folder):
    """MONAI Label compares new prompts with the served ones on validation images that neither
    trained on or chose: not in the served record, not repeating a training image by content, and
    at most half of the validation images (the rest choose the new prompts' best epoch)."""
    served = _model(tmp_path, record(tmp_path / "data", folder["training"], folder["validation"], 0.2, 0.1))
    new = [_png(tmp_path / "new" / f"new{i}.png", seed=10 + i) for i in range(3)]
    # the served prompts' validation image, and two labelled since: one of three can be held out
    held, why = comparison_images(served, folder["training"][:2], folder["validation"] + new[:2])
    assert held == new[:1] and why == ""
    held, _ = comparison_images(served, folder["training"], folder["validation"] + folder["test"] + new)
    assert held == folder["test"] + new[:1]
    # a copy of a training image under another name trained the new prompts
    copy = tmp_path / "new" / "copy.png"
    shutil.copy(new[0]["image"], copy)
    copied = {"image": str(copy), "label": str(copy)}
    assert comparison_images(served, [new[0]], [copied, new[1], *folder["validation"]])[0] == new[1:2]
    # two copies in the validation: the one left in chooses the new prompts, so neither is held out
    assert comparison_images(served, [], [new[0], copied, *folder["validation"]]) == (
        [],
        f"each validation image trained or chose the prompts in {served}, or repeats an image of this training",
    )
    assert comparison_images(served, [], new[:1]) == (
        [],
        "the only validation image is needed to choose the new prompts' best epoch",
    )
    assert comparison_images(served, [], []) == ([], "there are no validation images")

    unknown = _model(tmp_path, None)  # what trained these prompts is unknown: no image is known unseen
    assert comparison_images(unknown, [], new)[0] == []
    assert "records no split" in comparison_images(unknown, [], new)[1]
    partial = record(tmp_path / "data", folder["training"], [], 0.2, 0.2, started_from=unknown)
    partial_path = save_prompts(quiet(PTSAM, "tiny"), tmp_path / "partial.pt", split=partial)
    held, why = comparison_images(partial_path, [], new)
    assert held == [] and "record of its split is incomplete" in why and "records no split" in why
