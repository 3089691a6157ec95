"""Readers and writers: every format, layout and geometry; atomic writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from scripts.common.files import atomic_write
from scripts.data.io import ImageReadError, UnsupportedFileError, list_images, probe_image, read_image, write_label
from scripts.data.io.formats import SERIES_SEP
from scripts.data.io.writers import output_path
from scripts.demo.synthetic import ct_affine, ct_case, write_dicom_series


def _tiff(tmp_path: Path, array: np.ndarray, name: str = "x.tif", **kw) -> Path:
    path = tmp_path / name
    tifffile.imwrite(path, array, **kw)
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
def test_tiff_2d_bit_depths(tmp_path, dtype):
    data = (np.arange(40 * 50).reshape(40, 50) % 251).astype(dtype)
    array, meta = read_image(_tiff(tmp_path, data))
    assert array.shape == (1, 40, 50) and array.dtype == dtype
    assert np.array_equal(array[0], data)
    assert meta["format"] == "tiff" and meta["axial_axis"] is None and meta["source_dtype"] == np.dtype(dtype).name


@pytest.mark.parametrize(
    ("shape", "kw", "expected_shape", "channel_first_from"),
    [
        ((40, 50, 3), {}, (3, 40, 50), "last"),  # RGB, samples last
        ((3, 40, 50), {"photometric": "rgb", "planarconfig": "separate"}, (3, 40, 50), "first"),
        ((2, 40, 50), {"metadata": {"axes": "CYX"}}, (2, 40, 50), "first"),
        ((40, 50, 2), {}, (2, 40, 50), "last"),  # (H, W, C) that tifffile stores as pages of H x C
    ],
)
def test_tiff_channels(tmp_path, shape, kw, expected_shape, channel_first_from):
    data = np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16)
    array, meta = read_image(_tiff(tmp_path, data, **kw))
    assert array.shape == expected_shape and meta["axial_axis"] is None
    expected = np.moveaxis(data, -1, 0) if channel_first_from == "last" else data
    assert np.array_equal(array, expected)
    assert probe_image(tmp_path / "x.tif")["spatial_shape"] == expected_shape[1:]


@pytest.mark.parametrize("kw", [{}, {"imagej": True, "metadata": {"axes": "ZYX"}}])
def test_tiff_z_stack_is_a_volume(tmp_path, kw):
    data = np.random.default_rng(1).integers(0, 60000, (7, 30, 40)).astype(np.uint16)
    array, meta = read_image(_tiff(tmp_path, data, **kw))
    assert array.shape == (1, 7, 30, 40) and meta["axial_axis"] == 0
    assert np.array_equal(array[0], data)


def test_tiff_z_stack_with_channels(tmp_path):
    data = np.random.default_rng(2).integers(0, 9, (6, 2, 30, 40)).astype(np.uint16)
    array, meta = read_image(_tiff(tmp_path, data, imagej=True, metadata={"axes": "ZCYX"}))
    assert array.shape == (2, 6, 30, 40) and meta["axial_axis"] == 0
    assert np.array_equal(array, np.moveaxis(data, 1, 0))


def test_tiff_5d_is_refused(tmp_path):
    data = np.zeros((2, 3, 4, 30, 40), np.uint16)
    path = _tiff(tmp_path, data, photometric="minisblack", metadata={"axes": "TZCYX"})
    with pytest.raises(ImageReadError, match=rf"{path}: unsupported TIFF dimensionality"):
        read_image(path)


def test_nifti_2d_3d_4d(tmp_path):
    affine = np.diag([0.5, 0.7, 3.0, 1.0])
    for name, shape in (("a.nii.gz", (20, 30)), ("b.nii", (20, 30, 12)), ("c.nii.gz", (20, 30, 12, 2))):
        data = np.random.default_rng(3).normal(size=shape).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), str(tmp_path / name))
        array, meta = read_image(tmp_path / name)
        assert np.allclose(meta["affine"], affine)
        if len(shape) == 2:
            assert array.shape == (1, 20, 30) and meta["axial_axis"] is None
        elif len(shape) == 3:
            assert array.shape == (1, 20, 30, 12) and meta["axial_axis"] == 2
            assert np.array_equal(array[0], data)
        else:
            assert array.shape == (2, 20, 30, 12) and np.array_equal(array, np.moveaxis(data, 3, 0))


def test_nifti_axial_axis_follows_the_affine(tmp_path):
    # A sagittal acquisition: voxel axis 0 runs along the body's long axis.
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((10, 20, 30), np.int16), affine), str(tmp_path / "sag.nii.gz"))
    assert read_image(tmp_path / "sag.nii.gz")[1]["axial_axis"] == 0


def test_real_nifti_from_nibabel():
    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    array, meta = read_image(path)
    img = nib.load(str(path))
    assert array.shape == (1, *img.shape) and np.allclose(meta["affine"], img.affine)


def test_dicom_series_geometry_matches_simpleitk_nifti(tmp_path):
    rng = np.random.default_rng(4)
    volume, _ = ct_case(rng, shape=(40, 32, 10))
    affine = ct_affine(rng)
    write_dicom_series(volume, affine, tmp_path / "series", seed=0)
    array, meta = read_image(tmp_path / "series")
    assert array.shape == (1, 40, 32, 10) and np.array_equal(array[0], volume)
    assert np.allclose(meta["affine"], affine, atol=1e-4) and meta["axial_axis"] == 2 and meta["modality"] == "CT"
    # SimpleITK's own NIfTI export of the series, read by nibabel, has the same geometry.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "ref.nii.gz"))
    assert np.allclose(nib.load(str(tmp_path / "ref.nii.gz")).affine, meta["affine"], atol=1e-4)
    assert probe_image(tmp_path / "series")["spatial_shape"] == (40, 32, 10)


def test_unrelated_dicom_files_are_separate_images(tmp_path):
    rng = np.random.default_rng(5)
    for seed in (0, 1):
        volume, _ = ct_case(rng, shape=(24, 20, 6))
        write_dicom_series(volume, ct_affine(rng), tmp_path / f"s{seed}", seed=seed)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for seed in (0, 1):
        for f in (tmp_path / f"s{seed}").iterdir():
            shutil.copy(f, mixed / f"{seed}_{f.name}")
    images, ignored = list_images(mixed)
    assert len(images) == 2 and all(SERIES_SEP in p for p in images) and ignored == []
    shapes = sorted(read_image(p)[0].shape for p in images)
    assert shapes == [(1, 24, 20, 6), (1, 24, 20, 6)]
    with pytest.raises(ImageReadError, match="2 series in this folder"):
        read_image(mixed)


def test_single_real_dicom_file(tmp_path):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    array, meta = read_image(source)
    ds = dcmread(source)
    assert array.shape == (1, ds.Columns, ds.Rows) and meta["format"] == "dicom" and meta["axial_axis"] is None
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(array[0].T, expected)
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(source, folder / "image")  # no suffix: recognised by the DICM marker
    assert len(list_images(folder)[0]) == 1


def test_png_and_jpeg_modes(tmp_path):
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((30, 40), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray((rng.integers(0, 60000, (30, 40))).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    assert np.array_equal(read_image(tmp_path / "rgb.png")[0], np.moveaxis(rgb, -1, 0))
    assert np.array_equal(read_image(tmp_path / "rgba.png")[0], np.moveaxis(rgb, -1, 0))
    deep, meta = read_image(tmp_path / "deep.png")
    assert deep.shape == (1, 30, 40) and deep.max() > 255
    jpeg, meta = read_image(tmp_path / "photo.jpg")
    assert jpeg.shape == (3, 30, 40) and meta["format"] == "jpeg" and meta["source_dtype"] == "uint8"


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFileError, match="notes.txt: not a supported image file"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="gone.png: no such file"):
        read_image(tmp_path / "gone.png")
    with pytest.raises(UnsupportedFileError, match="no image path given"):
        probe_image("")  # not the working directory read as a DICOM folder


# Writers


def _roundtrip(label: np.ndarray, meta: dict, out: Path) -> tuple[np.ndarray, dict]:
    path = write_label(label, meta, out)
    assert path.parent == out and "_seg" in path.name
    return read_image(path)


def test_write_nifti_keeps_affine_shape_and_header(tmp_path):
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.zeros((20, 16, 5), np.int16), affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(tmp_path / "case.nii.gz"))
    _, meta = read_image(tmp_path / "case.nii.gz")
    label = np.zeros((20, 16, 5), np.int64)
    label[5:10, 4:8, 1:3] = 2
    back, back_meta = _roundtrip(label, meta, tmp_path / "out")
    assert (tmp_path / "out" / "case_seg.nii.gz").is_file()
    assert np.array_equal(back[0], label) and np.allclose(back_meta["affine"], affine)
    assert nib.load(str(tmp_path / "out" / "case_seg.nii.gz")).header.get_xyzt_units() == ("mm", "sec")
    assert back.dtype == np.uint8


def test_write_dicom_series_as_nifti_in_its_geometry(tmp_path):
    rng = np.random.default_rng(7)
    volume, organ = ct_case(rng, shape=(30, 26, 8))
    affine = ct_affine(rng)
    write_dicom_series(volume, affine, tmp_path / "patient", seed=3)
    _, meta = read_image(tmp_path / "patient")
    back, back_meta = _roundtrip(organ, meta, tmp_path / "out")
    assert np.array_equal(back[0], organ) and np.allclose(back_meta["affine"], affine, atol=1e-4)
    assert output_path(meta, tmp_path / "out").name == "patient_seg.nii.gz"


def test_write_tiff_and_png(tmp_path):
    stack = np.zeros((5, 30, 40), np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    _, meta = read_image(tmp_path / "stack.tif")
    label = np.zeros((5, 30, 40), np.int64)
    label[1, 3:9, 4:12] = 300  # instance labels above 255 -> uint16
    back, _ = _roundtrip(label, meta, tmp_path / "out")
    assert back.shape == (1, 5, 30, 40) and back.dtype == np.uint16 and np.array_equal(back[0], label)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "frame.jpg")
    _, meta = read_image(tmp_path / "frame.jpg")
    label2 = np.zeros((30, 40), np.int64)
    label2[10:20, 5:15] = 1
    back, back_meta = _roundtrip(label2, meta, tmp_path / "out")
    assert back_meta["format"] == "png" and np.array_equal(back[0], label2)


def test_write_refuses_a_label_of_another_shape(tmp_path):
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "a.png")
    _, meta = read_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a.png: label shape \(40, 30\) differs"):
        write_label(np.zeros((40, 30)), meta, tmp_path / "out")


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "case_seg.nii.gz"
    target.write_bytes(b"previous result")

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["case_seg.nii.gz"]  # no temporary file left


def test_one_output_name_per_input_for_predictions_and_overlays():
    from scripts.data.io.formats import output_stem
    from scripts.data.io.writers import output_path

    uid = "1.2.826.0.1.3680043.8.498.1.24"
    assert output_stem("/d/ct_001.nii.gz") == "ct_001" and output_stem("/d/cells.tif") == "cells"
    assert output_stem(f"/d/dicom/ct_004::{uid}") == f"ct_004_{uid[-12:]}"  # a folder may hold several series
    meta = {"filename_or_obj": f"/d/dicom/ct_004::{uid}", "format": "dicom"}
    assert output_path(meta, "/out").name == f"ct_004_{uid[-12:]}_seg.nii.gz"
