"""Dataset discovery and the up-front check: every bad input named with its file and problem."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from scripts.common.options import problems
from scripts.data.datasets import DatasetError, check_case, check_dataset, describe_split, held_out, load_datalist
from scripts.data.io import list_images
from scripts.data.io.formats import split_series
from scripts.data.pairs import LabelGridError
from scripts.data.transforms import LoadImageAnyd
from scripts.demo.synthetic import ct_affine, ct_case, write_dicom_series


def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _cells(rng=None) -> np.ndarray:
    rng = rng or np.random.default_rng(0)
    return rng.integers(0, 255, (32, 40)).astype(np.uint8)


def _mask(value: int = 1) -> np.ndarray:
    mask = np.zeros((32, 40), np.uint8)
    mask[5:15, 5:20] = value
    return mask


def test_dataset_json_sections(synthetic):
    root = synthetic / "ct"
    train, val, test, infer = (load_datalist(root, s) for s in ("training", "validation", "test", "inference"))
    assert (len(train), len(val), len(test)) == (4, 2, 2)
    assert all(Path(it["image"]).is_absolute() and Path(it["label"]).is_file() for it in train + val + test)
    names = [{Path(it["image"]).name for it in split} for split in (train, val, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])  # no image in two splits
    # what inference predicts: the test list, labelled or not (the DICOM series has no label of its own)
    assert infer[0]["image"].endswith("dicom/ct_006") and len(infer) == 3 and "label" not in infer[0]


def test_an_image_in_two_splits_is_refused(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name, _cells())
        _png(tmp_path / f"mask_{name}", _mask())
    entry = {"image": "a.png", "label": "mask_a.png"}
    spec = {"training": [entry, {"image": "b.png", "label": "mask_b.png"}], "test": [entry]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match=r"a.png: listed under both training and test"):
        load_datalist(tmp_path, "test")


def _listed(root: Path, splits: dict[str, list[str]]) -> None:
    """dataset.json with these image lists, each image with a mask of its name under masks/."""
    spec = {part: [{"image": n, "label": f"masks/{Path(n).stem}.png"} for n in names] for part, names in splits.items()}
    (root / "dataset.json").write_text(json.dumps(spec))


def test_one_case_or_patient_in_two_listed_splits_is_refused(tmp_path):
    # dataset.json's lists, not a fraction, put images of one case or patient in two splits: a PNG
    # and its TIFF, a DICOM series and its NIfTI, series of one PatientID, a patient's slices
    rng = np.random.default_rng(3)
    for name in ("img1.png", "img2.png", "img3.png", "case1.png", "pat01_s0.png", "pat01_s1.png"):
        _png(tmp_path / name, _cells(rng))
        _png(tmp_path / "masks" / f"{Path(name).stem}.png", _mask())
    tifffile.imwrite(tmp_path / "case1.tif", _cells(rng))
    for seed, name in enumerate(("ct6", "mr9")):  # two series of one patient
        volume, _ = ct_case(rng, shape=(24, 20, 3))
        write_dicom_series(volume, ct_affine(rng), tmp_path / name, seed=seed, patient_id="P6")
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 3), np.float32), np.eye(4)), str(tmp_path / "ct6.nii.gz"))
    splits = {
        "training": ["img1.png", "case1.png", "ct6", "pat01_s0.png"],
        "validation": ["img2.png", "ct6.nii.gz", "pat01_s1.png"],
        "test": ["img3.png", "case1.tif"],
    }
    _listed(tmp_path, splits)
    for section in ("training", "test"):  # training and evaluation alike, before any work
        with pytest.raises(DatasetError) as raised:
            load_datalist(tmp_path, section)
        found = raised.value.problems
        assert len(found) == 2
        assert found[0].startswith(
            f"case name 'case1' ties images listed under training and test in {tmp_path}: "
            f"{tmp_path / 'case1.png'} (training), {tmp_path / 'case1.tif'} (test); one case or patient in two"
        )
        assert found[1].startswith(
            f"case name 'ct6' ties images listed under training and validation in {tmp_path}: "
            f"{tmp_path / 'ct6'} (training), {tmp_path / 'ct6.nii.gz'} (validation);"
        )

    # the twins in one split: the two series of PatientID P6 are still in two (their names differ)
    splits["training"] += ["case1.tif", "ct6.nii.gz"]
    splits["validation"] = ["img2.png", "pat01_s1.png"]
    splits["test"] = ["img3.png", "mr9"]
    _listed(tmp_path, splits)
    with pytest.raises(DatasetError) as raised:
        load_datalist(tmp_path, "training")
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith(
        f"PatientID 'P6' ties images listed under training and test in {tmp_path}: {tmp_path / 'ct6'} (training), "
        f"{tmp_path / 'mr9'} (test);"
    )
    splits["test"] = ["img3.png"]
    _listed(tmp_path, splits)
    assert len(load_datalist(tmp_path, "training")) == 6  # pat01's slices are one patient only by split_group
    with pytest.raises(DatasetError) as raised:
        load_datalist(tmp_path, "training", split_group=r"^([a-z]+\d+)")
    assert [p.split(";", 1)[0] for p in raised.value.problems] == [
        f"split_group 'pat01' ties images listed under training and validation in {tmp_path}: "
        f"{tmp_path / 'pat01_s0.png'} (training), {tmp_path / 'pat01_s1.png'} (validation)"
    ]


def test_without_a_test_set_one_is_carved_out_before_validation(tmp_path):
    for i in range(20):
        _png(tmp_path / "imagesTr" / f"case{i}.png", _cells())
        _png(tmp_path / "labelsTr" / f"case{i}.png", _mask())
    train, val, test = (load_datalist(tmp_path, s) for s in ("training", "validation", "test"))
    assert (len(train), len(val), len(test)) == (13, 3, 4)  # 20 % of 20 for test, then 20 % of the 16 left
    names = [{Path(it["image"]).name for it in split} for split in (train, val, test)]
    assert set().union(*names) == {f"case{i}.png" for i in range(20)} and sum(map(len, names)) == 20
    assert test == load_datalist(tmp_path, "test", test_fraction=0.2)  # deterministic
    assert len(load_datalist(tmp_path, "training", test_fraction=0.0)) == 16
    with pytest.raises(DatasetError, match="no held-out test cases"):
        load_datalist(tmp_path, "test", test_fraction=0.0)
    _png(tmp_path / "imagesTs" / "new.png", _cells())  # a labelled test set of its own: nothing carved
    _png(tmp_path / "labelsTs" / "new.png", _mask())
    assert [Path(i["image"]).name for i in load_datalist(tmp_path, "test")] == ["new.png"]
    assert len(load_datalist(tmp_path, "training")) == 16


def _decathlon(root: Path, n_train: int, n_test: int, labelled_test: int, listed: bool = True) -> None:
    """The Decathlon's layout: dataset.json lists ``test`` as image paths alone; labelsTs/ holds
    the labels of the first ``labelled_test`` test images (added later by the user)."""
    rng = np.random.default_rng(1)
    for i in range(n_train):
        _png(root / "imagesTr" / f"case{i}.png", _cells(rng))
        _png(root / "labelsTr" / f"case{i}.png", _mask())
    for i in range(n_test):
        _png(root / "imagesTs" / f"test{i}.png", _cells(rng))
        if i < labelled_test:
            _png(root / "labelsTs" / f"test{i}.png", _mask())
    training = [{"image": f"./imagesTr/case{i}.png", "label": f"./labelsTr/case{i}.png"} for i in range(n_train)]
    spec: dict = {"training": training}
    if listed:
        spec["test"] = [f"./imagesTs/test{i}.png" for i in range(n_test)]
    (root / "dataset.json").write_text(json.dumps(spec))


def test_dataset_json_test_images_take_their_labels_from_labels_ts(tmp_path):
    _decathlon(tmp_path, n_train=10, n_test=3, labelled_test=3)
    train, val, test = (load_datalist(tmp_path, s) for s in ("training", "validation", "test"))
    assert [(Path(i["image"]).name, Path(i["label"]).parent.name) for i in test] == [
        (f"test{i}.png", "labelsTs") for i in range(3)
    ]
    assert all(Path(i["label"]).name == Path(i["image"]).name and Path(i["label"]).is_file() for i in test)
    assert (len(train), len(val)) == (8, 2)  # nothing carved out of the training images for testing
    assert {Path(i["image"]).parent.name for i in train + val} == {"imagesTr"}
    check_dataset(test)
    # inference still predicts the listed test images, without labels
    assert [set(i) for i in load_datalist(tmp_path, "inference")] == [{"image"}] * 3


def test_dataset_json_without_a_test_list_uses_the_images_ts_pairs(tmp_path):
    _decathlon(tmp_path, n_train=10, n_test=2, labelled_test=2, listed=False)
    assert [Path(i["image"]).name for i in load_datalist(tmp_path, "test")] == ["test0.png", "test1.png"]
    assert len(load_datalist(tmp_path, "training")) + len(load_datalist(tmp_path, "validation")) == 10


def test_dataset_json_test_images_without_labels_ts(tmp_path):
    _decathlon(tmp_path, n_train=10, n_test=3, labelled_test=0)  # no labelsTs/: carved out as before
    test = load_datalist(tmp_path, "test")
    assert len(test) == 2 and {Path(i["image"]).parent.name for i in test} == {"imagesTr"}
    shutil.rmtree(tmp_path)
    _decathlon(tmp_path, n_train=10, n_test=3, labelled_test=2)  # one test image not labelled: named
    test = load_datalist(tmp_path, "test")
    assert len(test) == 3 and len(load_datalist(tmp_path, "training")) == 8
    missing = r"(?s)1 problem.*test2.png: missing label \(.*labelsTs/test2.png does not exist\)"
    with pytest.raises(DatasetError, match=missing):
        check_dataset(test)


def test_images_and_labels_folders_with_deterministic_split(tmp_path, caplog):
    for i in range(10):
        _png(tmp_path / "imagesTr" / f"case{i}.png", _cells())
        _png(tmp_path / "labelsTr" / f"case{i}.png", _mask())
    (tmp_path / "imagesTr" / "README.txt").write_text("notes")
    _png(tmp_path / "imagesTs" / "new.png", _cells())
    with caplog.at_level(logging.INFO, logger="scripts.data.datasets"):
        train = load_datalist(tmp_path, "training")
    assert "ignored" in caplog.text and "README.txt" in caplog.text
    val = load_datalist(tmp_path, "validation")
    assert (len(train), len(val)) == (6, 2)  # and 2 held out for testing (imagesTs/ has no labels)
    assert {Path(i["image"]).name for i in train}.isdisjoint(Path(i["image"]).name for i in val)
    assert all(Path(i["label"]).name == Path(i["image"]).name for i in train)
    assert val == load_datalist(tmp_path, "validation")  # the same split every time
    assert [Path(i["image"]).name for i in load_datalist(tmp_path, "inference")] == ["new.png"]


def test_split_does_not_depend_on_order():
    items = [{"image": f"/x/case{i}.png"} for i in range(20)]
    names = [sorted(i["image"] for i in held_out(order, 0.2)[1]) for order in (items, items[::-1])]
    assert names[0] == names[1] and len(names[0]) == 4


def _old_held_out(names: list[str], fraction: float, salt: str) -> set[str]:
    """The cut before groups: every image ranked alone by a hash of ``salt`` and its name."""
    ranked = sorted(names, key=lambda n: hashlib.sha256((salt + n).encode()).hexdigest())
    return set(ranked[: max(1, math.floor(len(names) * fraction + 0.5))])


def test_an_image_alone_in_its_group_is_split_as_before_groups():
    # no two images of one case: the split of every existing model.pt's record stays what it was
    names = [f"case{i}.png" for i in range(30)] + [f"ct_{i:03d}.nii.gz" for i in range(7)]
    items = [{"image": f"/nowhere/{n}"} for n in names]
    for salt in ("", "test:", "x"):
        for fraction in (0.05, 0.1, 0.2, 0.25, 0.5, 0.7):
            kept, out = held_out(items, fraction, salt)
            assert {Path(i["image"]).name for i in out} == _old_held_out(names, fraction, salt)
            assert len(kept) + len(out) == len(items)


def test_held_out_keeps_at_least_one_image():
    # 2 images and a fraction >= 0.75 held out both (training on nothing); one is kept now
    items = [{"image": "/x/a.png"}, {"image": "/x/b.png"}]
    kept, out = held_out(items, 0.8)
    assert (len(kept), len(out)) == (1, 1)


# A folder with a case in two formats (a DICOM series and its NIfTI, a PNG and its TIFF), two DICOM
# series of one patient, 2D slices of three patients as PNG files, and single images.
_SLICES = {"pat01": 4, "pat02": 3, "pat03": 2}
_PATTERN = r"^([a-z]+\d+)"  # pat01_slice000.png -> pat01; every other name here matches too


def _grouped_folder(root: Path) -> None:
    rng = np.random.default_rng(5)
    for name, patient, seed in (("ct6", "P6", 1), ("mr7", "P78", 2), ("mr8", "P78", 3)):
        volume, _ = ct_case(rng, shape=(24, 20, 3))
        write_dicom_series(volume, ct_affine(rng), root / "imagesTr" / name, seed=seed, patient_id=patient)
    volume, label = ct_case(rng, shape=(24, 20, 3))
    for folder, array in (("imagesTr", volume.astype(np.float32)), ("labelsTr", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(root / folder / "ct6.nii.gz"))
    names = ["case1.png"] + [f"{p}_slice{k:03d}.png" for p, n in _SLICES.items() for k in range(n)]
    names += [f"solo{i}.png" for i in range(1, 7)]
    for name in names:
        _png(root / "imagesTr" / name, _cells(rng))
        _png(root / "labelsTr" / name, _mask())
    tifffile.imwrite(root / "imagesTr" / "case1.tif", _cells(rng))
    tifffile.imwrite(root / "labelsTr" / "case1.tif", _mask())


def _patient(image: str) -> str:
    """Which case or patient an image of ``_grouped_folder`` is: what must never be split."""
    name = split_series(image)[0].name
    if name in ("mr7", "mr8"):
        return "P78"  # two series, one PatientID
    return name.split("_")[0].split(".")[0]  # ct6 = ct6.nii.gz, case1.png = case1.tif, pat01_slice...


def test_a_case_or_patient_is_never_split_across_sets(tmp_path):
    _grouped_folder(tmp_path)
    items = [{"image": p} for p in list_images(tmp_path / "imagesTr")[0]]
    assert len(items) == 21
    tied = {"ct6", "P78", "case1"}  # grouped with no knob: the same name, the same PatientID
    salts = ["", "test:", *(f"s{i}" for i in range(12))]
    old_splits = 0
    for salt in salts:
        for fraction in (0.1, 0.2, 0.35, 0.5, 0.8):
            for split_group, must_stay in ((None, tied), (_PATTERN, tied | set(_SLICES))):
                kept, out = held_out(items, fraction, salt, split_group)
                assert kept and out and len(kept) + len(out) == 21
                sides = [{_patient(i["image"]) for i in part} for part in (kept, out)]
                assert not sides[0] & sides[1] & must_stay, (salt, fraction, split_group)
            out_names = _old_held_out([Path(i["image"]).name for i in items], fraction, salt)
            old = [
                {_patient(i["image"]) for i in items if (Path(i["image"]).name in out_names) == side} for side in (0, 1)
            ]
            old_splits += bool(old[0] & old[1] & (tied | set(_SLICES)))
    assert old_splits >= 60  # the cut before groups split a case or patient in 69 of these 70


def test_load_datalist_keeps_a_patient_in_one_of_training_validation_and_test(tmp_path, caplog):
    _grouped_folder(tmp_path)
    for test_fraction in (0.2, 0.3, 0.5):
        parts = [load_datalist(tmp_path, s, 0.25, test_fraction, _PATTERN) for s in ("training", "validation", "test")]
        patients = [{_patient(i["image"]) for i in part} for part in parts]
        assert sum(map(len, parts)) == 21 and all(parts)
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    with caplog.at_level(logging.INFO, logger="scripts.data.datasets"):
        said = describe_split(parts[0], parts[1], _PATTERN)
    n = [len({_patient(i["image"]) for i in part}) for part in parts[:2]]
    assert said.startswith(f"training on {len(parts[0])} image(s) of {n[0]} case(s) or patient(s); ")
    assert f"{len(parts[1])} validation image(s) of {n[1]} case(s) or patient(s)" in said and said in caplog.text


def test_an_image_split_group_names_no_group_for_is_refused(tmp_path):
    for name in ("pat01_s0.png", "pat01_s1.png", "pat02_s0.png", "pat03_s0.png", "overview.png"):
        _png(tmp_path / "imagesTr" / name, _cells())
        _png(tmp_path / "labelsTr" / name, _mask())
    with pytest.raises(DatasetError) as raised:
        load_datalist(tmp_path, "training", split_group=r"^(pat\d+)_")
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith(
        f"{tmp_path / 'imagesTr' / 'overview.png'}: split_group '^(pat\\\\d+)_' names no group in its name "
        "'overview.png'"
    )
    (tmp_path / "imagesTr" / "overview.png").unlink()
    assert (
        len(load_datalist(tmp_path, "training", split_group=r"^(pat\d+)_")) == 2
    )  # pat01's two: a group of 2 is not held out for a target of 1
    # all of one patient: nothing can be held out without splitting it, which is said
    for name in ("pat02_s0.png", "pat03_s0.png"):
        (tmp_path / "imagesTr" / name).unlink()
    with pytest.raises(
        DatasetError, match=r"test_fraction=0.2: the 2 images to split form one group .*split_group 'pat01' for 2"
    ):
        load_datalist(tmp_path, "training", split_group=r"^(pat\d+)_")
    assert len(load_datalist(tmp_path, "training", 0.0, 0.0, r"^(pat\d+)_")) == 2


def test_a_split_group_that_is_no_regular_expression_is_refused(tmp_path):
    found = problems({"split_group": "(pat"})
    assert len(found) == 1 and found[0].startswith("--split_group '(pat': expected a regular expression; this one")
    assert problems({"split_group": 3}) == [
        "--split_group 3: expected a regular expression (a non-empty string) or null"
    ]
    assert problems({"split_group": r"^(pat\d+)_"}) == problems({"split_group": None}) == []
    with pytest.raises(ValueError, match=r"split_group '\(pat': not a regular expression"):
        load_datalist(tmp_path, "training", split_group="(pat")


def test_inference_section_falls_back_to_loose_files_and_single_file(tmp_path):
    _png(tmp_path / "a.png", _cells())
    _png(tmp_path / "b.png", _cells())
    (tmp_path / "results.csv").write_text("x")
    assert [Path(i["image"]).name for i in load_datalist(tmp_path, "inference")] == ["a.png", "b.png"]
    assert load_datalist(tmp_path / "a.png", "inference") == [{"image": str((tmp_path / "a.png").resolve())}]


def test_inference_with_nothing_to_predict_says_where_it_looked(tmp_path):
    # a training folder (imagesTr/ + labelsTr/ only): nothing to predict, said before any work
    _png(tmp_path / "imagesTr" / "a.png", _cells())
    _png(tmp_path / "labelsTr" / "a.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(DatasetError) as raised:
        load_datalist(tmp_path, "inference")
    message = str(raised.value)
    assert f"{tmp_path}: no images to predict" in message
    assert "no `test` list in dataset.json, no imagesTs/, no image files in the folder itself" in message
    assert f"its imagesTr/ holds 1 image(s): to predict them, give --dataset_dir {tmp_path / 'imagesTr'}" in message
    # an empty imagesTs/ is named as such
    (tmp_path / "imagesTs").mkdir()
    with pytest.raises(DatasetError, match="imagesTs/ holds no image files"):
        load_datalist(tmp_path, "inference")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images to predict"):
        load_datalist(tmp_path / "empty", "inference")


def test_a_training_folder_of_another_layout_is_told_the_expected_one(tmp_path):
    _png(tmp_path / "task" / "imagesTr" / "a.png", _cells())
    _png(tmp_path / "task" / "labelsTr" / "a.png", np.zeros((32, 40), np.uint8))
    # the images folder itself given: its parent is meant
    with pytest.raises(DatasetError) as raised:
        load_datalist(tmp_path / "task" / "imagesTr")
    assert f"give the folder that holds it: --dataset_dir {tmp_path / 'task'}" in str(raised.value)
    # images and masks side by side: the expected layout is said
    _png(tmp_path / "flat" / "a.png", _cells())
    _png(tmp_path / "flat" / "a_mask.png", np.zeros((32, 40), np.uint8))
    with pytest.raises(DatasetError) as raised:
        load_datalist(tmp_path / "flat")
    assert "it holds 2 image file(s): put the images in imagesTr/ and their labels, named as" in str(raised.value)


def test_inference_leaves_out_earlier_predictions_beside_their_images(tmp_path, caplog):
    # predictions written into the images' own folder (--output_dir = --dataset_dir) must not be
    # predicted again as images the next time (a_seg.png -> a_seg_seg.png)
    for name in ("a.png", "a_seg.png", "b_seg.png", "c.nii.gz", "c_seg.nii.gz"):
        _png(tmp_path / name, _cells()) if name.endswith(".png") else nib.save(
            nib.Nifti1Image(np.zeros((16, 16, 3), np.uint8), np.eye(4)), tmp_path / name
        )
    with caplog.at_level(logging.INFO, logger="scripts.data.datasets"):
        found = [Path(i["image"]).name for i in load_datalist(tmp_path, "inference")]
    assert found == ["a.png", "b_seg.png", "c.nii.gz"]  # b_seg.png has no image of its own beside it
    assert f"ignored {tmp_path / 'a_seg.png'}: the prediction of a.png beside it" in caplog.text


def test_a_missing_label_of_a_held_out_test_case_stops_training_too(tmp_path):
    # test_fraction carves the test images out of imagesTr/ by a hash of their names: a missing
    # label there is the same mistake as one in training, and was found only by evaluation, after
    # the whole training
    for i in range(6):
        _png(tmp_path / "imagesTr" / f"c{i}.png", _cells())
        _png(tmp_path / "labelsTr" / f"c{i}.png", np.zeros((32, 40), np.uint8))
    held = Path(load_datalist(tmp_path, "test")[0]["image"]).name
    (tmp_path / "labelsTr" / held).unlink()
    with pytest.raises(DatasetError) as raised:
        load_datalist(tmp_path, "training")
    assert raised.value.problems == [
        f"{tmp_path / 'imagesTr' / held}: missing label ({tmp_path / 'labelsTr' / held} does not exist; "
        "held out as a test image by test_fraction, evaluation needs it)"
    ]
    assert load_datalist(tmp_path, "test")  # evaluation's own check names it with the rest


def test_good_synthetic_datasets_pass(synthetic):
    for modality, label_map in (("microscopy", None), ("ct", None), ("endoscopy", {255: 1})):
        check_dataset(
            load_datalist(synthetic / modality) + load_datalist(synthetic / modality, "validation"), label_map=label_map
        )


def _problems(item, **kw) -> str:
    found = check_case(item, **kw)
    assert len(found) == 1, found
    return found[0]


def test_unreadable_and_empty_files(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert _problems({"image": str(tmp_path / "broken.png")}).startswith(f"{tmp_path / 'broken.png'}: unreadable PNG")
    (tmp_path / "empty.tif").write_bytes(b"")
    assert _problems({"image": str(tmp_path / "empty.tif")}) == f"{tmp_path / 'empty.tif'}: empty file"


def test_truncated_nifti(tmp_path):
    path = tmp_path / "ct.nii.gz"
    data = np.random.default_rng(0).normal(size=(40, 40, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert _problems({"image": str(path)}).startswith(f"{path}: unreadable NIfTI file")


def test_dicom_with_truncated_pixel_data(tmp_path):
    rng = np.random.default_rng(1)
    volume, _ = ct_case(rng, shape=(32, 28, 6))
    write_dicom_series(volume, ct_affine(rng), tmp_path / "series", seed=0)
    victim = tmp_path / "series" / "slice_003.dcm"
    victim.write_bytes(victim.read_bytes()[:-500])
    message = _problems({"image": str(tmp_path / "series")}, require_label=False)
    assert message.startswith(f"{tmp_path / 'series'}:") and "slice_003.dcm" in message and "unreadable" in message


def test_shape_mismatch_and_missing_label(tmp_path):
    image = _png(tmp_path / "img.png", _cells())
    label = _png(tmp_path / "lab.png", np.zeros((30, 40), np.uint8))
    assert _problems({"image": image, "label": label}) == (
        f"{label}: label shape (30, 40) differs from image shape (32, 40)"
    )
    assert _problems({"image": image, "label": str(tmp_path / "nope.png")}) == (
        f"{image}: missing label ({tmp_path / 'nope.png'} does not exist)"
    )
    assert _problems({"image": image}) == f"{image}: missing label"


def test_a_label_named_otherwise_than_its_image_is_suggested(tmp_path):
    # labels pair with images by file name: a mask saved as <name>_mask.png, or nnU-Net's image
    # <name>_0000.nii.gz beside the label <name>.nii.gz, is named in the refusal
    for image_name, label_name in (("case00.png", "case00_mask.png"), ("liver_0000.png", "liver.png")):
        root = tmp_path / image_name.split(".")[0]
        _png(root / "imagesTr" / image_name, _cells())
        _png(root / "imagesTr" / "other.png", _cells())
        _png(root / "labelsTr" / label_name, np.zeros((32, 40), np.uint8))
        _png(root / "labelsTr" / "other.png", np.zeros((32, 40), np.uint8))
        items = load_datalist(root, "training", val_fraction=0, test_fraction=0)
        with pytest.raises(DatasetError) as raised:
            check_dataset(items)
        assert raised.value.problems == [
            f"{root / 'imagesTr' / image_name}: missing label ({root / 'labelsTr' / image_name} does not exist; "
            f"labels pair with images by file name: is it {root / 'labelsTr' / label_name}?)"
        ]


def test_a_jpeg_label_is_named_as_the_cause_of_its_stray_values(tmp_path):
    # JPEG's lossy compression leaves values between 0 and 255 along every edge of a 0/255 mask;
    # mapping 255 to 1 (what the message would otherwise suggest) cannot fix that
    image = _png(tmp_path / "img.png", _cells())
    mask = np.zeros((32, 40), np.uint8)
    mask[8:20, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=90)
    message = _problems({"image": image, "label": str(tmp_path / "mask.jpg")}, label_map={255: 1})
    assert message.startswith(f"{tmp_path / 'mask.jpg'}: label values ")
    assert message.endswith("a JPEG label: lossy compression changes the values along every edge; save masks as PNG")


def _lps_case(tmp_path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """A NIfTI stored LPS (affine diag(-1, -1, 2)) holding an object that no flip maps onto
    itself; returns the image's path, its object mask and its affine."""
    mask = np.zeros((32, 24, 8), np.uint8)
    mask[3:12, 2:6, 1:3] = 1
    mask[3:6, 6:18, 1:3] = 1
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    image = (mask * 500.0 + np.random.default_rng(3).normal(0, 5, mask.shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    return str(tmp_path / "img.nii.gz"), mask, affine


def test_a_label_stored_in_another_orientation_is_put_on_the_images_grid(tmp_path):
    image, mask, affine = _lps_case(tmp_path)
    label = str(tmp_path / "lab.nii.gz")
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(mask, affine)), label)  # the same grid, stored RAS
    assert nib.aff2axcodes(nib.load(label).affine) == ("R", "A", "S")
    assert not np.array_equal(nib.load(label).get_fdata(), mask)  # voxel for voxel, it is not the image's
    assert check_case({"image": image, "label": label}) == []
    loaded = LoadImageAnyd(["image", "label"])({"image": image, "label": label})
    assert np.array_equal(loaded["label"][0].numpy(), mask)  # the object's voxels, Dice 1
    assert np.allclose(loaded["label"].affine.numpy(), affine)


def test_a_label_on_another_grid_is_refused_naming_both(tmp_path):
    image, mask, affine = _lps_case(tmp_path)
    label = str(tmp_path / "lab.nii.gz")
    shifted = affine.copy()
    shifted[0, 3] = 3.0  # three voxels off along x, and stored RAS
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(mask, shifted)), label)
    message = _problems({"image": image, "label": label})
    assert message.startswith(f"{label}: not on the voxel grid of its image {image}")
    assert "affine is RAS oriented, the image's LPS" in message and "up to 3 mm apart" in message
    with pytest.raises(LabelGridError, match="not on the voxel grid"):
        LoadImageAnyd(["image", "label"])({"image": image, "label": label})


def _image_2d(path: Path, mask: np.ndarray) -> str:
    """A 2D DICOM or NIfTI of ``mask`` (rows, columns) written by SimpleITK: x is the column, y the
    row, as in every viewer."""
    image = sitk.GetImageFromArray(mask.astype(np.int16) * 300 + 20)
    image.SetSpacing((0.5, 0.7))
    sitk.WriteImage(image, str(path))
    return str(path)


def _l_shape(shape: tuple[int, int]) -> np.ndarray:
    """An object that no transpose or flip maps onto itself: a bar along the top and one down its left."""
    mask = np.zeros(shape, np.uint8)
    mask[4:9, 10:30] = 1
    mask[4:25, 10:15] = 1
    return mask


@pytest.mark.parametrize("image_name", ["img.dcm", "img.nii.gz"])
@pytest.mark.parametrize("mask_name", ["mask.png", "mask.tif"])
def test_a_png_or_tiff_mask_of_a_dicom_or_nifti_image_is_read_in_its_axes(tmp_path, image_name, mask_name):
    rows_cols = _l_shape((40, 40))  # square: the shapes agree either way
    image = _image_2d(tmp_path / image_name, rows_cols)
    if image_name.endswith(".dcm"):  # the mask's rows are the DICOM's rows, as pydicom reads them
        assert np.array_equal(pydicom.dcmread(image).pixel_array > 100, rows_cols)
    mask = str(tmp_path / mask_name)
    if mask_name.endswith(".png"):
        Image.fromarray(rows_cols).save(mask)
    else:
        tifffile.imwrite(mask, rows_cols)
    assert check_case({"image": image, "label": mask}) == []
    loaded = LoadImageAnyd(["image", "label"])({"image": image, "label": mask})
    assert np.array_equal(loaded["label"][0].numpy(), (loaded["image"][0].numpy() > 100).astype(np.float32))


def test_a_transposed_mask_of_a_dicom_image_is_refused_with_a_hint(tmp_path):
    rows_cols = _l_shape((40, 48))
    image = _image_2d(tmp_path / "img.dcm", rows_cols)
    mask = _png(tmp_path / "mask.png", np.ascontiguousarray(rows_cols.T))  # saved from the (x, y) array
    message = _problems({"image": image, "label": mask})
    assert message.startswith(f"{mask}: label shape (40, 48) differs from image shape (48, 40)")
    assert "save it transposed" in message


def test_label_values_outside_the_classes(tmp_path):
    image = _png(tmp_path / "img.png", _cells())
    label = _png(tmp_path / "lab.png", _mask(255))
    message = _problems({"image": image, "label": label})
    assert message.startswith(f"{label}: label values 255 are not among the declared classes [1]")
    assert check_case({"image": image, "label": label}, label_map={255: 1}) == []
    assert check_case({"image": image, "label": label}, classes=[255]) == []


def test_five_dimensional_tiff(tmp_path):
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 2, 16, 16), np.uint16), photometric="minisblack", metadata={"axes": "TZCYX"})
    assert "unsupported TIFF dimensionality" in _problems({"image": str(path)})


def test_nan_inf_and_constant_images(tmp_path):
    data = np.random.default_rng(2).normal(size=(20, 20, 10)).astype(np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    assert _problems({"image": str(tmp_path / "nan.nii.gz")}, require_label=False).endswith("NaN or infinite values")
    tifffile.imwrite(tmp_path / "inf.tif", np.full((20, 20), np.inf, np.float32))
    assert "NaN or infinite" in _problems({"image": str(tmp_path / "inf.tif")}, require_label=False)
    flat = _png(tmp_path / "flat.png", np.full((20, 20), 9, np.uint8))
    assert _problems({"image": flat}, require_label=False) == f"{flat}: constant image (every value is 9)"


def test_tiny_image(tmp_path):
    small = _png(tmp_path / "small.png", np.arange(5 * 30, dtype=np.uint8).reshape(5, 30))
    assert _problems({"image": small}, require_label=False) == (f"{small}: image of shape (5, 30) is smaller than 8 px")


def test_pixel_budget_is_checked_from_the_header(tmp_path):
    # A header announcing 4096^3 voxels in front of almost no data: refused by the budget,
    # not by reading (which would run out of memory for a real file of that size).
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 1000)
    message = _problems({"image": str(path)})
    assert message.startswith(f"{path}: 68,719,476,736 values") and "max_voxels=268,435,456" in message
    big = _png(tmp_path / "big.png", _cells())
    assert "exceed the budget max_voxels=1,000" in _problems({"image": big}, max_voxels=1000)


def test_check_dataset_lists_every_problem(tmp_path):
    good = {"image": _png(tmp_path / "ok.png", _cells()), "label": _png(tmp_path / "ok_l.png", _mask())}
    (tmp_path / "bad.png").write_bytes(b"garbage")
    bad = {"image": str(tmp_path / "bad.png"), "label": good["label"]}
    flat = {"image": _png(tmp_path / "flat.png", np.zeros((32, 40), np.uint8)), "label": good["label"]}
    with pytest.raises(DatasetError) as info:
        check_dataset([good, bad, flat])
    assert len(info.value.problems) == 2
    assert "bad.png: unreadable PNG" in str(info.value) and "flat.png: constant image" in str(info.value)
    with pytest.raises(DatasetError, match="no cases found"):
        check_dataset([])


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset folder"):
        load_datalist(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="neither dataset.json nor imagesTr/"):
        load_datalist(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json: not valid JSON"):
        load_datalist(tmp_path)


def test_dataset_json_paths_and_copy(tmp_path, synthetic):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic / "microscopy", copy)
    spec = json.loads((copy / "dataset.json").read_text())
    assert spec["numTraining"] == 4 and spec["labels"] == {"0": "background", "1": "cell"}
    assert all(Path(i["image"]).is_relative_to(copy.resolve()) for i in load_datalist(copy))
