"""The synthetic few-shot datasets: deterministic, complete, and what each modality promises."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from scipy import ndimage

from helpers import BUNDLE
from scripts.data.io import read_image
from scripts.demo.synthetic import generate, shapes_case, shapes_scene


def test_one_command_writes_every_dataset(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.demo.synthetic",
            "--output_dir",
            str(tmp_path),
            "--n_train",
            "2",
            "--n_val",
            "1",
            "--n_test",
            "1",
        ],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    names = {"microscopy": "cell", "ct": "organ", "endoscopy": "polyp", "cells_rods": "cell", "shapes": "ellipse"}
    for modality, name in names.items():
        spec = json.loads((tmp_path / modality / "dataset.json").read_text())
        assert (len(spec["training"]), len(spec["validation"])) == (2, 1)
        assert spec["labels"]["1"] == name
        labelled_test = [e for e in spec["test"] if isinstance(e, dict)]
        assert len(labelled_test) == 1 and len(spec["test"]) == (2 if modality == "ct" else 1)  # + the DICOM series
        for entry in spec["training"] + spec["validation"] + labelled_test:
            assert (tmp_path / modality / entry["image"]).is_file() and (tmp_path / modality / entry["label"]).is_file()


def test_default_size_is_the_papers_few_shot_setting(tmp_path):
    spec = json.loads(open(generate(str(tmp_path), modalities="microscopy")["microscopy"]).read())
    assert (len(spec["training"]), len(spec["validation"]), len(spec["test"])) == (16, 4, 4)
    assert all("label" in e for e in spec["test"])  # held-out test images, scored by evaluation


def test_deterministic_by_seed(tmp_path):
    for run in ("a", "b", "c"):
        generate(str(tmp_path / run), seed=0 if run != "c" else 1, n_train=1, n_val=0, n_test=0)
    for rel in ("microscopy/imagesTr/cells_000.tif", "ct/imagesTr/ct_000.nii.gz", "endoscopy/labelsTr/polyp_000.png"):
        a, b, c = (read_image(tmp_path / run / rel)[0] for run in ("a", "b", "c"))
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def _objects(mask: np.ndarray) -> list[np.ndarray]:
    labels, n = ndimage.label(mask)
    return [labels == i for i in range(1, n + 1)]


def _elongation(region: np.ndarray) -> float:
    """Ratio of the principal axes of a region's pixel coordinates."""
    spread = np.linalg.eigvalsh(np.cov(np.argwhere(region).T.astype(float)))
    return float(np.sqrt(spread[1] / spread[0]))


def test_modalities_look_as_promised(synthetic):
    cells, meta = read_image(synthetic / "microscopy/imagesTr/cells_000.tif")
    mask, _ = read_image(synthetic / "microscopy/labelsTr/cells_000.tif")
    assert meta["source_dtype"] == "uint16" and cells.max() > 255 and set(np.unique(mask)) == {0, 1}
    assert cells[mask > 0].mean() > 2 * cells[mask == 0].mean()  # cells are brighter than background
    ct, ct_meta = read_image(synthetic / "ct/imagesTr/ct_000.nii.gz")
    organ, _ = read_image(synthetic / "ct/labelsTr/ct_000.nii.gz")
    assert ct.ndim == 4 and ct_meta["axial_axis"] == 2 and organ.sum() > 500
    field, _ = read_image(synthetic / "cells_rods/imagesTr/field_000.tif")
    classes, _ = read_image(synthetic / "cells_rods/labelsTr/field_000.tif")
    assert set(np.unique(classes)) == {0, 1, 2}
    assert max(map(_elongation, _objects(classes[0] == 1))) < 2.5  # two kinds: round cells ...
    assert min(map(_elongation, _objects(classes[0] == 2))) > 3  # ... and rods
    background = field[0][classes[0] == 0].mean()
    assert field[0][classes[0] == 1].mean() > field[0][classes[0] == 2].mean() > 1.5 * background  # rods dimmer
    assert 60 < ct[organ > 0].mean() < 160 and ct.min() <= -1000  # HU: organ, air
    frame, frame_meta = read_image(synthetic / "endoscopy/imagesTr/polyp_000.jpg")
    polyp, _ = read_image(synthetic / "endoscopy/labelsTr/polyp_000.png")
    assert frame.shape[0] == 3 and frame_meta["format"] == "jpeg" and set(np.unique(polyp)) == {0, 255}


def test_dicom_series_is_the_same_case_as_its_nifti(synthetic):
    folder = json.loads((synthetic / "ct" / "dataset.json").read_text())["test"][0]  # the first test case
    assert folder == "dicom/ct_006"  # 4 training, 2 validation, then the test cases
    series, s_meta = read_image(synthetic / "ct" / folder)
    nifti, n_meta = read_image(synthetic / "ct/imagesTr/ct_006.nii.gz")
    assert np.array_equal(series, nifti) and np.allclose(s_meta["affine"], n_meta["affine"], atol=1e-4)


def test_shapes_tell_their_kinds_apart_only_by_shape():
    """The kind-selective task: the ellipses are labelled and nothing else, and over many scenes
    ellipses and the other objects have the same colours and sizes (only the shape differs)."""
    rng = np.random.default_rng(0)
    stats = {"ellipse": [], "other": []}
    for _ in range(30):
        image, regions, kinds = shapes_scene(rng)
        assert "ellipse" in kinds and set(kinds) - {"ellipse"}
        for region, kind in zip(regions, kinds, strict=True):
            stats["ellipse" if kind == "ellipse" else "other"].append((image[region].mean(), region.sum()))
    (ellipse_colour, ellipse_area), (other_colour, other_area) = (np.mean(stats[k], axis=0) for k in stats)
    assert abs(ellipse_colour - other_colour) < 12 and 0.75 < ellipse_area / other_area < 1.33

    image, label = shapes_case(np.random.default_rng(1))
    _, regions, kinds = shapes_scene(np.random.default_rng(1))
    assert image.shape == (256, 256, 3) and set(np.unique(label)) == {0, 1}
    ellipses = np.any([r for r, k in zip(regions, kinds, strict=True) if k == "ellipse"], axis=0)
    assert np.array_equal(label == 1, ellipses)  # the ellipses, and not the pixels of any other object
