"""Inference runs each file on its own: a bad file, whether found by the screening before any
work or failing later (loading, writing), is named in the summary with its reason, leaves no
partial outputs, and every other file is written; the exit status is 1. Evaluation refuses such
a file before any work instead of scoring the rest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import tifffile
from monai.bundle import ConfigParser
from pydicom.data import get_testdata_file

from helpers import BUNDLE, monai_bundle
from scripts.data.io import read_image
from scripts.data.io.geojson import rasterise
from scripts.data.io.readers import series_files

EVALUATE = "['configs/train.yaml','configs/evaluate.yaml']"
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID")
TYPE_2 += ("AccessionNumber", "ReferringPhysicianName")


@pytest.fixture(scope="module")
def model(synthetic, tmp_path_factory) -> Path:
    """A `tiny` model trained one epoch on the synthetic microscopy (grayscale TIFFs)."""
    out = tmp_path_factory.mktemp("model")
    done = monai_bundle(
        "run", "training", "--config_file", "configs/train.yaml", "--sam_variant", "tiny", "--epochs", "1",
        "--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(out / "eval"),
        "--ckpt_dir", str(out / "models"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "models"


def _infer(dataset: Path, model: Path, out: Path, *extra: str):
    return monai_bundle(
        "run", "inference", "--config_file", "configs/inference.yaml", "--sam_variant", "tiny",
        "--dataset_dir", str(dataset), "--ckpt_dir", str(model), "--output_dir", str(out), *extra,
    )  # fmt: skip


def _cells(synthetic: Path, index: int) -> Path:
    return synthetic / "microscopy" / "imagesTr" / f"cells_{index:03d}.tif"


def _rgba(path: Path) -> Path:
    rgba = np.zeros((64, 80, 4), np.uint8)
    rgba[..., :3] = np.arange(80, dtype=np.uint8)[None, :, None]
    rgba[..., 3] = 255
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=[0])  # a 4th sample that is no alpha
    return path


def test_bad_files_are_named_and_every_good_file_is_written(synthetic, model, tmp_path):
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    (folder / "a_broken.tif").write_bytes(b"II*\x00 not a real tiff")  # unreadable: screened
    shutil.copy(_cells(synthetic, 4), folder / "b_cells.tif")
    _rgba(folder / "c_rgba.tif")  # 4 channels the preprocessing refuses: screened from its header
    shutil.copy(_cells(synthetic, 5), folder / "d_cells.tif")
    shutil.copy(synthetic / "ct" / "imagesTr" / "ct_000.nii.gz", folder / "e_volume.nii.gz")  # no polygons: screened
    shutil.copy(_cells(synthetic, 6), folder / "f_cells.tif")  # fails while writing, after its GeoJSON
    shutil.copy(_cells(synthetic, 7), folder / "g_cells.tif")
    (out / "f_cells_seg.tif").mkdir(parents=True)  # where f's label would go: a folder
    done = _infer(folder, model, out, "--geojson", "true")
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "3 written, 4 failed" in log and "Traceback" not in log
    failed = [line.split("failed ", 1)[1] for line in log.splitlines() if "-   failed " in line]
    assert [line.split(":", 1)[0] for line in failed] == [
        str(folder / n) for n in ("a_broken.tif", "c_rgba.tif", "e_volume.nii.gz", "f_cells.tif")
    ]
    assert "a_broken.tif: unreadable TIFF file" in failed[0]
    assert "c_rgba.tif: has 4 channels; choose 3 with `channels`" in failed[1]
    assert "e_volume.nii.gz: a volume" in failed[2] and "Is a directory" in failed[3]
    # every good file written, with its polygons; nothing of the failed ones, no temporary files
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        [f"{n}_seg.{ext}" for n in ("b_cells", "d_cells", "g_cells") for ext in ("tif", "geojson")]
        + ["f_cells_seg.tif"]
    )
    assert not any((out / "f_cells_seg.tif").iterdir())
    for name in ("b_cells", "d_cells", "g_cells"):
        label, _ = read_image(out / f"{name}_seg.tif")
        image, _ = read_image(folder / f"{name}.tif")
        assert label.shape == image.shape
        drawn = rasterise(json.loads((out / f"{name}_seg.geojson").read_text()), label.shape[1:])
        union = np.logical_or(drawn > 0, label[0] > 0).sum()
        assert union == 0 or np.logical_and(drawn > 0, label[0] > 0).sum() / union >= 0.95


def test_a_file_that_goes_bad_after_the_screening_is_skipped(synthetic, model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, name in ((4, "a.tif"), (5, "b.tif"), (6, "c.tif")):
        shutil.copy(_cells(synthetic, index), folder / name)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "sam_variant": "tiny",
            "ckpt_dir": str(model),
            "dataset_dir": str(folder),
            "output_dir": str(tmp_path / "out"),
        }
    )
    parser.get_parsed_content("initialize")
    screening = parser.get_parsed_content("screening")
    assert len(screening.good) == 3 and not screening.failures
    (folder / "b.tif").write_bytes(b"II*\x00 truncated since")  # loading fails in the dataset
    parser.get_parsed_content("evaluator").run()
    assert len(screening.failures) == 1
    assert screening.failures[0].startswith(f"{folder / 'b.tif'}: unreadable TIFF file")
    assert [Path(s).name for s, _ in screening.written] == ["a.tif", "c.tif"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_seg.tif", "c_seg.tif"]
    with pytest.raises(SystemExit) as stop:
        screening.finish()
    assert stop.value.code == 1


def _anonymised(series: Path, folder: Path) -> Path:
    """A copy of ``series`` without the patient and study attributes anonymisers remove."""
    shutil.copytree(series, folder)
    for file in folder.iterdir():
        ds = pydicom.dcmread(file)
        for keyword in TYPE_2:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(file)
    return folder


def test_dicom_seg_for_anonymised_series_and_refusals_by_header(synthetic, model, tmp_path):
    folder, out = tmp_path / "studies", tmp_path / "out"
    series = synthetic / "ct" / "dicom" / "ct_006"
    _anonymised(series, folder / "a_anon")
    (folder / "b_multiframe").mkdir(parents=True)
    multiframe = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    multiframe.FrameOfReferenceUID = pydicom.uid.generate_uid()  # all a SEG needs but single frames
    multiframe.save_as(folder / "b_multiframe" / "sc.dcm")
    shutil.copytree(series, folder / "c_ct")
    shutil.copy(synthetic / "ct" / "imagesTr" / "ct_000.nii.gz", folder / "d_ct.nii.gz")
    # prompts of 2D images on volumes (allowed): only the DICOM SEG matters here
    done = _infer(folder, model, out, "--dicom_seg", "true", "--allow_other_kind", "true")
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "2 written, 2 failed" in log and "Traceback" not in log
    assert "b_multiframe/sc.dcm: a multi-frame instance (2 frames)" in log
    assert "d_ct.nii.gz: a nifti file; a DICOM SEG (dicom_seg: true) is made for DICOM inputs" in log
    segs = sorted(out.glob("*_seg.dcm"))
    assert [p.name.split("_")[0] for p in segs] == ["a", "c"]
    for path in segs:
        seg = hd.seg.segread(path)
        label, _ = read_image(str(path).replace("_seg.dcm", "_seg.nii.gz"))
        sources = [pydicom.dcmread(f) for f in series_files(str(folder / path.name.split("_seg")[0].rsplit("_", 1)[0]))]
        masks = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources], combine_segments=True
        )
        assert np.array_equal(masks, np.transpose(np.asarray(label[0]).astype(np.int64), (2, 1, 0)))
    anonymous = hd.seg.segread(segs[0])
    assert all(keyword in anonymous and str(anonymous.get(keyword) or "") == "" for keyword in TYPE_2)
    assert "PatientBirthDate" not in pydicom.dcmread(sorted((folder / "a_anon").iterdir())[0])  # sources untouched


def test_evaluation_refuses_a_file_it_could_not_score_before_any_work(synthetic, model, tmp_path):
    dataset = Path(shutil.copytree(synthetic / "microscopy", tmp_path / "dataset"))
    spec = json.loads((dataset / "dataset.json").read_text())
    _rgba(dataset / "imagesTr" / "rgba.tif")
    tifffile.imwrite(dataset / "labelsTr" / "rgba.tif", np.zeros((64, 80), np.uint8))
    spec["test"].append({"image": "imagesTr/rgba.tif", "label": "labelsTr/rgba.tif"})
    (dataset / "dataset.json").write_text(json.dumps(spec))
    done = monai_bundle(
        "run", "evaluating", "--config_file", EVALUATE, "--sam_variant", "tiny", "--dataset_dir", str(dataset),
        "--output_dir", str(tmp_path / "eval"), "--ckpt_dir", str(model),
    )  # fmt: skip
    assert done.returncode != 0
    assert "1 problem(s) in the dataset" in done.stderr  # refused up front, not stopped on the way
    assert f"{dataset / 'imagesTr' / 'rgba.tif'}: has 4 channels; choose 3 with `channels`" in done.stderr
    assert "Engine run" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "eval" / "metrics.csv").exists()
