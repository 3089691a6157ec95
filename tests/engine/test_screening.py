"""Inference's per-file pieces on real files: what the headers refuse before any work, a file
failing in the preprocessing as a record, and outputs written all or none."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image
from pydicom.data import get_testdata_file

from scripts.data.datasets import DatasetError
from scripts.data.io import read_image
from scripts.data.kinds import ImageKindError, kind_of_images
from scripts.data.postprocess import AllOrNothing, WriteGeoJSONd, WriteLabeld
from scripts.data.transforms import CheckImageKindd, LoadImageAnyd, SamChannelsd, SamInputd, SamIntensityd
from scripts.demo.synthetic import write_dicom_series
from scripts.engine.screening import FAILURE, PerFileDataset, check_inputs, check_kinds, header_problems


def _rgba_tiff(path: Path) -> str:
    # RGB and a fourth sample that is no alpha (which the reader would drop): four channels to choose from
    data = np.random.default_rng(0).integers(0, 255, (40, 50, 4), dtype=np.uint8)
    tifffile.imwrite(path, data, photometric="rgb", extrasamples=[0])
    return str(path)


def _nifti(path: Path, shape: tuple[int, ...]) -> str:
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return str(path)


def _multiframe(path: Path) -> str:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()  # referencable but for its frames
    ds.save_as(path)
    return str(path)


def test_channels_the_preprocessing_refuses_are_found_in_the_header(tmp_path):
    rgba = _rgba_tiff(tmp_path / "rgba.tif")
    assert header_problems(rgba) == [f"{rgba}: has 4 channels; choose 3 with `channels`, e.g. [0, 1, 2]"]
    assert header_problems(rgba, channels=[0, 1, 2]) == []
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(rgb)
    assert header_problems(str(rgb), channels=[0, 3]) == [f"{rgb}: has 3 channels; `channels` asks for [0, 3]"]
    # the transform refuses exactly what the screening announced
    with pytest.raises(ValueError, match="has 4 channels; choose 3"):
        SamChannelsd("image")(LoadImageAnyd("image")({"image": rgba}))


def test_geojson_is_refused_for_volumes_not_for_one_plane_with_singleton_axes(tmp_path):
    volume = _nifti(tmp_path / "volume.nii.gz", (40, 30, 5))
    coronal = _nifti(tmp_path / "coronal.nii.gz", (40, 1, 30))
    problems = header_problems(volume, only_2d=True)
    assert problems == [f"{volume}: a volume (40, 30, 5); GeoJSON polygons (geojson: true) are for 2D images"]
    assert header_problems(coronal, only_2d=True) == []
    assert header_problems(_multiframe(tmp_path / "mf.dcm"), only_2d=True)[0].endswith(
        "a volume (100, 100, 2); GeoJSON polygons (geojson: true) are for 2D images"
    )


def test_dicom_seg_is_refused_for_other_formats_and_multiframe_instances(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(png)
    assert header_problems(str(png), only_dicom=True) == [
        f"{png}: a png file; a DICOM SEG (dicom_seg: true) is made for DICOM inputs"
    ]
    mf = _multiframe(tmp_path / "mf.dcm")
    assert header_problems(mf, only_dicom=True) == [
        f"{mf}: no DICOM SEG (dicom_seg: true) can be made: a multi-frame instance (2 frames); "
        "a DICOM SEG is written for series of single-frame instances"
    ]
    assert header_problems(get_testdata_file("CT_small.dcm"), only_dicom=True) == []


def test_evaluation_inputs_are_refused_before_any_work_naming_each_file(tmp_path):
    rgba = _rgba_tiff(tmp_path / "rgba.tif")
    good = _nifti(tmp_path / "good.nii.gz", (40, 30, 5))
    with pytest.raises(DatasetError) as refused:
        check_inputs([{"image": good, "label": good}, {"image": rgba, "label": rgba}])
    assert refused.value.problems == [f"{rgba}: has 4 channels; choose 3 with `channels`, e.g. [0, 1, 2]"]
    check_inputs([{"image": rgba}], channels=[2, 1, 0])


def test_images_of_another_kind_than_the_prompts_learned_from_are_refused_by_their_headers(tmp_path, caplog):
    """A 2D image and a 3D volume as the readers give them; prompts trained on one kind refuse
    the other before any work (inference's screening, evaluation), and so does the preprocessing
    where it runs alone (MONAI Label), unless allow_other_kind."""
    field = tmp_path / "field.tif"
    tifffile.imwrite(field, np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8))
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 30, 40), np.uint16), metadata={"axes": "ZYX"})
    volume, thin = _nifti(tmp_path / "volume.nii.gz", (40, 30, 5)), _nifti(tmp_path / "thin.nii.gz", (40, 30, 1))
    write_dicom_series(np.zeros((40, 30, 4), np.int16), np.eye(4), tmp_path / "series", seed=0)
    series = str(tmp_path / "series")
    assert kind_of_images([field, thin, get_testdata_file("CT_small.dcm")]) == "2d"  # one slice is 2D
    assert kind_of_images([volume, str(stack), series]) == "volume"
    assert kind_of_images([field, volume]) == "mixed" and kind_of_images([]) is None

    problems = header_problems(volume, image_kind="2d")
    assert len(problems) == 1 and problems[0].startswith(
        f"{volume}: a 3D volume, but the prompts of model.pt were trained on 2D images (image_kind '2d'): "
    )
    assert "set allow_other_kind true" in problems[0]
    assert header_problems(str(field), image_kind="volume")[0].startswith(
        f"{field}: a 2D image, but the prompts of model.pt were trained on 3D volumes (image_kind 'volume')"
    )
    for trained in ("volume", "mixed", None):  # the same kind, both, or not recorded: nothing to refuse
        assert header_problems(volume, image_kind=trained) == []

    items = [{"image": str(field)}, {"image": volume}, {"image": series}, {"image": thin}]
    with pytest.raises(DatasetError) as refused:
        check_kinds(items, "2d")
    assert [p.split(": a 3D volume, but")[0] for p in refused.value.problems] == [volume, series]
    check_kinds(items, None)
    with caplog.at_level("WARNING"):
        check_kinds(items, "2d", allow_other_kind="true")
    assert f"{series}: a 3D volume, but the prompts" in caplog.text and "scored anyway" in caplog.text

    load = LoadImageAnyd("image")
    with pytest.raises(ImageKindError, match="field.tif: a 2D image, but the prompts of model.pt were trained on 3D"):
        CheckImageKindd("image", trained_kind="volume")(load({"image": str(field)}))
    assert CheckImageKindd("image", trained_kind="volume")(load({"image": series}))["image"].shape == (1, 40, 30, 4)
    assert CheckImageKindd("image", "volume", allow_other_kind=True)(load({"image": str(field)}))["image"].ndim == 3
    with pytest.raises(ValueError, match="image_kind '3d' is none of 2d, volume, mixed"):
        CheckImageKindd("image", trained_kind="3d")


def _preprocessing() -> Compose:
    return Compose(
        [LoadImageAnyd("image"), SamIntensityd("image"), SamChannelsd("image"), SamInputd("image", image_size=64)]
    )


def test_a_file_failing_in_the_preprocessing_becomes_a_record(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", (40, 30))
    rgba = _rgba_tiff(tmp_path / "rgba.tif")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(Path(good).read_bytes()[:40])
    data = PerFileDataset([{"image": good}, {"image": rgba}, {"image": str(broken)}], transform=_preprocessing())
    assert tuple(data[0]["image"].shape) == (3, 64, 64)
    assert data[1] == {
        "image": rgba,
        FAILURE: f"{rgba}: has 4 channels; choose 3 with `channels`, e.g. [0, 1, 2]",
    }
    assert data[2]["image"] == str(broken) and data[2][FAILURE].startswith(f"{broken}: unreadable NIfTI file")


def _item(label: np.ndarray, source: str) -> dict:
    image = MetaTensor(torch.zeros(1, *label.shape), meta={"filename_or_obj": source, "format": "png"})
    image.meta.update(affine=torch.eye(4), spatial_shape=label.shape)
    return {"image": image, "pred": torch.from_numpy(label[None].astype(np.float32))}


def _writers(out: Path) -> AllOrNothing:
    return AllOrNothing([WriteGeoJSONd(output_dir=str(out)), WriteLabeld(output_dir=str(out))])


def test_outputs_are_written_all_or_none(tmp_path):
    label = np.zeros((20, 30), np.int64)
    label[4:9, 5:20] = 1
    written = _writers(tmp_path / "out")(_item(label, str(tmp_path / "a.png")))
    assert Path(written["pred_geojson_path"]).is_file() and Path(written["pred_path"]).is_file()
    assert np.array_equal(read_image(written["pred_path"])[0][0], label)
    blocked = tmp_path / "out" / "b_seg.png"
    blocked.mkdir()  # the label cannot be written where a folder is
    with pytest.raises(RuntimeError) as failed:
        _writers(tmp_path / "out")(_item(label, str(tmp_path / "b.png")))
    assert isinstance(failed.value.__cause__, IsADirectoryError)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_seg.geojson", "a_seg.png", "b_seg.png"]
