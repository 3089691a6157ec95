"""Evaluation and inference workflows: metrics that recompute, outputs in the inputs' geometry,
bad inputs reported while the rest is processed."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser

from helpers import BUNDLE, bf16_units, monai_bundle
from scripts.data.datasets import load_datalist
from scripts.data.io import read_image
from scripts.data.io.geojson import rasterise
from scripts.data.io.readers import series_files
from scripts.data.postprocess import instance_labels
from scripts.model.prompt_file import RECIPE_KEY, encode_json, read_recipe

EVALUATE = "['configs/train.yaml','configs/evaluate.yaml']"


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory) -> Path:
    """A `tiny` model trained for 2 epochs on the synthetic microscopy data."""
    out = tmp_path_factory.mktemp("trained")
    done = monai_bundle(
        "run", "training", "--config_file", "configs/train.yaml", "--sam_variant", "tiny", "--epochs", "2",
        "--dataset_dir", str(synthetic / "microscopy"),
        "--output_dir", str(out / "eval"), "--ckpt_dir", str(out / "models"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _infer(dataset: Path, trained: Path, out: Path, *extra: str):
    return monai_bundle(
        "run", "inference", "--config_file", "configs/inference.yaml", "--sam_variant", "tiny",
        "--dataset_dir", str(dataset), "--ckpt_dir", str(trained / "models"), "--output_dir", str(out), *extra,
    )  # fmt: skip


def test_evaluation_csv_matches_a_recomputation(synthetic, trained, tmp_path, monkeypatch):
    # The ONNX export goes to a cache of this test's, not the user's (~/.cache/ptsam/encoders,
    # where each new export also prunes old ones to a budget).
    monkeypatch.setenv("PTSAM_CACHE_DIR", str(tmp_path / "cache"))
    done = monai_bundle(
        "run", "evaluating", "--config_file", EVALUATE, "--sam_variant", "tiny",
        "--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(tmp_path / "eval"),
        "--ckpt_dir", str(trained / "models"), "--n_overlays", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "foreground" in done.stdout and "Dice" in done.stdout
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert len(rows) == 2 and {r["class"] for r in rows} == {"foreground"}
    # by default the held-out test images, none of which trained or chose the prompts
    assert {r["split"] for r in rows} == {"test"} and "scored on the test split" in done.stdout + done.stderr
    test_names = {Path(e["image"]).name for e in load_datalist(synthetic / "microscopy", "test")}
    chose = load_datalist(synthetic / "microscopy", "training") + load_datalist(synthetic / "microscopy", "validation")
    assert {Path(r["image"]).name for r in rows} == test_names and test_names.isdisjoint(
        Path(e["image"]).name for e in chose
    )
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in ("dice", "iou"))
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 1
    # The same model's written predictions, compared with the labels independently; with the
    # encoder on ONNX Runtime, which must agree with PyTorch's evaluation.
    infer = _infer(synthetic / "microscopy", trained, tmp_path / "pred", "--encoder_engine", "onnxruntime")
    assert infer.returncode == 0, infer.stderr[-3000:]
    for row in rows:
        image = Path(row["image"])
        pred, _ = read_image(tmp_path / "pred" / f"{image.stem}_seg.tif")
        truth, _ = read_image(image.parent.parent / "labelsTr" / image.name)
        inter = np.logical_and(pred > 0, truth > 0).sum()
        total = (pred > 0).sum() + (truth > 0).sum()
        dice = 1.0 if total == 0 else 2 * inter / total
        assert abs(dice - float(row["dice"])) < 1e-3  # a pixel at the threshold may flip under float rounding
        assert int(row["truth_voxels"]) == (truth > 0).sum()
        assert abs(int(row["pred_voxels"]) - (pred > 0).sum()) <= 10


def _evaluate(synthetic: Path, trained: Path, out: Path, *extra: str):
    return monai_bundle(
        "run", "evaluating", "--config_file", EVALUATE, "--sam_variant", "tiny",
        "--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(out),
        "--ckpt_dir", str(trained / "models"), "--n_overlays", "0", *extra,
    )  # fmt: skip


def _eval_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ptsam").experiment_id])
    return run


def test_approximate_encoders_score_as_float32_and_say_what_ran(synthetic, trained, tmp_path, monkeypatch):
    """Evaluation with int8 (ONNX Runtime) and bfloat16 (OpenVINO) encoders, as the docs advise
    before relying on them: each image's Dice within 0.02 of PyTorch's float32, and the MLflow
    run records the engine and precision that computed its scores. (Evaluation once crashed on
    any fast path: its embedding cache encodes between the evaluator's eval-mode iterations.)
    On a CPU without bfloat16 units, bfloat16 stops before any work, saying so."""
    monkeypatch.setenv("PTSAM_CACHE_DIR", str(tmp_path / "cache"))
    runs = {
        ("torch", "float32"): (),
        ("onnxruntime", "int8"): ("--encoder_engine", "onnxruntime", "--encoder_int8", "true"),
        ("openvino", "bfloat16"): ("--encoder_engine", "openvino", "--encoder_bf16", "true"),
    }
    if not bf16_units():
        refused = _evaluate(synthetic, trained, tmp_path / "bfloat16", *runs.pop(("openvino", "bfloat16")))
        assert refused.returncode != 0 and "this CPU has no bfloat16 units" in refused.stderr
        assert not (tmp_path / "bfloat16" / "metrics.csv").exists()
    scores = {}
    for (engine, precision), extra in runs.items():
        done = _evaluate(synthetic, trained, tmp_path / precision, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = csv.DictReader(open(tmp_path / precision / "metrics.csv"))
        scores[precision] = {r["image"]: float(r["dice"]) for r in rows}
        params = _eval_run(tmp_path / precision).data.params
        assert (params["encoder_engine"], params["encoder_precision"]) == (engine, precision)
    reference = scores.pop("float32")
    assert len(reference) == 2 and scores
    for precision, found in scores.items():
        assert found.keys() == reference.keys()
        assert all(abs(found[k] - reference[k]) <= 0.02 for k in reference), (precision, found, reference)
    assert list((tmp_path / "cache").glob("encoders/*/encoder.onnx"))  # the export the engines ran


def test_inference_keeps_shape_and_geometry_of_volumes_and_dicom(synthetic, trained, tmp_path):
    # prompts of 2D images on volumes, with their recipe: only geometry matters here
    done = _infer(synthetic / "ct", trained, tmp_path, "--allow_other_kind", "true")
    assert done.returncode == 0, done.stderr[-3000:]
    pairs = dict(line.split("wrote ", 1)[1].split(" -> ") for line in done.stdout.splitlines() if " wrote " in line)
    # the test list: the DICOM series ct_006, its NIfTI twin ct_006.nii.gz, and ct_007.nii.gz
    assert len(pairs) == 3 and len(set(pairs.values())) == 3
    for source, written in pairs.items():
        image, meta = read_image(source)
        pred, pred_meta = read_image(written)
        assert pred.shape == (1, *image.shape[1:]) and written.endswith(".nii.gz")
        assert np.allclose(pred_meta["affine"], meta["affine"], atol=1e-4)


def test_bad_file_is_reported_and_the_rest_processed(synthetic, trained, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("cells_004.tif", "cells_005.tif"):
        shutil.copy(synthetic / "microscopy" / "imagesTr" / name, folder / name)
    (folder / "broken.tif").write_bytes(b"II*\x00 not a real tiff")
    (folder / "notes.txt").write_text("ignored")
    done = _infer(folder, trained, tmp_path / "out")
    assert done.returncode == 1
    assert "broken.tif: unreadable TIFF file" in done.stdout + done.stderr
    assert "2 written, 1 failed" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cells_004_seg.tif", "cells_005_seg.tif"]


def test_prompts_trained_on_2d_images_refuse_a_volume_unless_allowed(synthetic, trained, tmp_path):
    """The microscopy prompts and their recipe (fitted to 2D TIFFs) would segment a CT volume's
    Hounsfield units into meaningless masks without a word: the volume is reported as failed,
    naming it and both kinds, and the TIFF is written; allow_other_kind runs both; a model.pt
    that records no kind (an older bundle's) refuses neither."""
    model = trained / "models" / "model.pt"
    assert read_recipe(model)["image_kind"] == "2d"  # found from the TIFFs that trained and chose the prompts
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(synthetic / "microscopy" / "imagesTr" / "cells_004.tif", folder / "cells_004.tif")
    shutil.copy(synthetic / "ct" / "imagesTr" / "ct_000.nii.gz", folder / "ct_000.nii.gz")
    refused = _infer(folder, trained, tmp_path / "refused")
    log = refused.stdout + refused.stderr
    assert refused.returncode == 1, log[-3000:]
    assert "1 written, 1 failed" in log and "Traceback" not in log
    assert (
        f"failed {folder / 'ct_000.nii.gz'}: a 3D volume, but the prompts of model.pt were trained on 2D images "
        "(image_kind '2d')" in log
    )
    assert sorted(p.name for p in (tmp_path / "refused").iterdir()) == ["cells_004_seg.tif"]

    allowed = _infer(folder, trained, tmp_path / "allowed", "--allow_other_kind", "true")
    log = allowed.stdout + allowed.stderr
    assert allowed.returncode == 0, log[-3000:]
    assert "2 written, 0 failed" in log and "segmented anyway (allow_other_kind true)" in log  # said, not silent
    assert sorted(p.name for p in (tmp_path / "allowed").iterdir()) == ["cells_004_seg.tif", "ct_000_seg.nii.gz"]

    state = torch.load(model, weights_only=True)
    state[RECIPE_KEY] = encode_json({k: v for k, v in read_recipe(model).items() if k != "image_kind"})
    torch.save(state, tmp_path / "older.pt")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser.update(
        {"bundle_root": str(BUNDLE), "sam_variant": "tiny", "model_path": str(tmp_path / "older.pt")}
        | {"dataset_dir": str(folder), "output_dir": str(tmp_path / "older")}
    )
    screening = parser.get_parsed_content("screening")
    assert len(screening.good) == 2 and not screening.failures
    prepared = parser.get_parsed_content("preprocessing")({"image": str(folder / "ct_000.nii.gz")})
    assert prepared["image"].ndim == 4  # the volume's slices, past the preprocessing's own check


def test_missing_model_is_a_clear_error(synthetic, tmp_path):
    done = _infer(synthetic / "microscopy", tmp_path, tmp_path / "out")
    assert done.returncode != 0
    assert f"no trained prompts at {tmp_path / 'models' / 'model.pt'}: train first" in done.stderr


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_crafted_pickle_as_model_is_refused(synthetic, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(pickle.dumps(_Payload()))
    done = _infer(synthetic / "microscopy", tmp_path, tmp_path / "out")
    assert done.returncode != 0 and "cannot be read as a weights-only PyTorch file" in done.stderr
    assert not (Path("PWNED").exists() or (tmp_path / "PWNED").exists())


def test_native_scale_inference(synthetic, tmp_path):
    native = tmp_path / "native"  # trained at native scale: model.pt records it, inference follows
    done = monai_bundle(
        "run", "training", "--config_file", "configs/train.yaml", "--sam_variant", "tiny", "--epochs", "1",
        "--scale", "native", "--dataset_dir", str(synthetic / "microscopy"),
        "--output_dir", str(native / "eval"), "--ckpt_dir", str(native / "models"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    done = _infer(synthetic / "microscopy", native, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for written in tmp_path.glob("*_seg.tif"):
        image, _ = read_image(synthetic / "microscopy" / "imagesTr" / written.name.replace("_seg", ""))
        assert read_image(written)[0].shape == (1, *image.shape[1:])


def test_geojson_polygons_for_qupath_match_the_written_labels(synthetic, trained, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("cells_004.tif", "cells_005.tif"):
        shutil.copy(synthetic / "microscopy" / "imagesTr" / name, folder / name)
    shutil.copy(synthetic / "ct" / "imagesTr" / "ct_000.nii.gz", folder / "ct_000.nii.gz")
    done = _infer(folder, trained, tmp_path / "out", "--geojson", "true")
    assert done.returncode == 1  # the volume is refused before inference, by name; the rest is written
    assert "ct_000.nii.gz: a volume" in done.stdout + done.stderr and "2 written, 1 failed" in done.stdout
    for name in ("cells_004", "cells_005"):
        collection = json.loads((tmp_path / "out" / f"{name}_seg.geojson").read_text())
        label, _ = read_image(tmp_path / "out" / f"{name}_seg.tif")
        label = np.asarray(label[0]).astype(np.int64)
        assert collection["type"] == "FeatureCollection"
        assert {f["properties"]["classification"]["name"] for f in collection["features"]} <= {"foreground"}
        drawn = rasterise(collection, label.shape)
        union = np.logical_or(drawn > 0, label > 0).sum()
        assert union == 0 or np.logical_and(drawn > 0, label > 0).sum() / union >= 0.95
        n_objects = len(np.unique(instance_labels(label))) - 1
        assert len(collection["features"]) == n_objects


def test_dicom_seg_for_a_dicom_series_matches_its_nifti_label(synthetic, trained, tmp_path):
    # prompts of 2D images on volumes (allowed): only the DICOM SEG matters here
    done = _infer(synthetic / "ct", trained, tmp_path, "--dicom_seg", "true", "--allow_other_kind", "true")
    # the test list holds the DICOM series ct_006 and two NIfTI volumes: those are refused by name
    assert done.returncode == 1
    assert "ct_007.nii.gz: a nifti file; a DICOM SEG (dicom_seg: true) is made for DICOM inputs" in done.stdout
    assert "1 written, 2 failed" in done.stdout
    series = synthetic / "ct" / "dicom" / "ct_006"
    seg = hd.seg.segread(tmp_path / "ct_006_seg.dcm")
    label, _ = read_image(tmp_path / "ct_006_seg.nii.gz")
    sources = [pydicom.dcmread(f) for f in series_files(str(series))]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["foreground"]
    version = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    assert seg.SoftwareVersions == version
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources], combine_segments=True
    )
    assert np.array_equal(masks, np.transpose(np.asarray(label[0]).astype(np.int64), (2, 1, 0)))
