"""Readers and writers: every format, layout and geometry; atomic writes."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image, ImageDraw

from scripts.common.files import atomic_write
from scripts.data.io import ImageReadError, UnsupportedFileError, list_images, probe_image, read_image, write_label
from scripts.data.io.formats import SERIES_SEP
from scripts.data.io.readers import series_files
from scripts.data.io.writers import output_path
from scripts.demo.synthetic import ct_affine, ct_case, write_dicom_series


def _tiff(tmp_path: Path, array: np.ndarray, name: str = "x.tif", **kw) -> Path:
    path = tmp_path / name
    tifffile.imwrite(path, array, **kw)
    return path


def _pydicom_file(name: str) -> Path:
    """One of the test files in pydicom's wheel (never fetched from the network)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not among pydicom's installed test files"
    return Path(path)


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

    source = _pydicom_file("CT_small.dcm")
    array, meta = read_image(source)
    ds = dcmread(source)
    assert array.shape == (1, ds.Columns, ds.Rows) and meta["format"] == "dicom" and meta["axial_axis"] is None
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(array[0].T, expected)
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(source, folder / "image")  # no suffix: recognised by the DICM marker
    assert len(list_images(folder)[0]) == 1


def _ct_series(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """6 slices 5 mm apart; slice k at LPS (40, 30, 20 + 5 k)."""
    volume, _ = ct_case(np.random.default_rng(8), shape=(24, 20, 6))
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    affine[:3, 3] = (-40.0, -30.0, 20.0)
    write_dicom_series(volume, affine, tmp_path / "series", seed=4)
    return tmp_path / "series", volume, affine


def _edit(path: Path, out: Path | None = None, **values) -> None:
    from pydicom import dcmread

    ds = dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    if "SOPInstanceUID" in values:
        ds.file_meta.MediaStorageSOPInstanceUID = values["SOPInstanceUID"]
    ds.save_as(out or path)


def test_a_copied_dicom_file_is_read_once(tmp_path, caplog):
    series, volume, affine = _ct_series(tmp_path)
    shutil.copy(series / "slice_003.dcm", series / "slice_003 (copy).dcm")  # the same instance twice
    with caplog.at_level("WARNING"):
        array, meta = read_image(series)
    assert array.shape == (1, 24, 20, 6) and np.array_equal(array[0], volume)
    assert np.allclose(meta["affine"], affine, atol=1e-4)  # 5 mm, not 25 mm / 6
    assert meta["duplicates"] == ["slice_003 (copy).dcm"] and "slice_003 (copy).dcm" in caplog.text
    assert probe_image(series)["spatial_shape"] == (24, 20, 6)
    assert len(series_files(series)) == 6


def test_one_instance_in_three_transfer_syntaxes_is_one_image(tmp_path):
    folder = tmp_path / "mr"
    folder.mkdir()
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        shutil.copy(_pydicom_file(name), folder / name)
    array, meta = read_image(folder)
    alone, alone_meta = read_image(_pydicom_file("MR_small.dcm"))
    assert array.shape == (1, 64, 64) and np.array_equal(array, alone)  # not 3 slices 1 mm apart
    assert np.allclose(meta["affine"], alone_meta["affine"]) and meta["axial_axis"] is None
    assert sorted(meta["duplicates"]) == ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"]
    assert probe_image(folder)["spatial_shape"] == (64, 64)


def test_different_instances_at_one_position_are_refused(tmp_path):
    series, _, _ = _ct_series(tmp_path)
    _edit(series / "slice_003.dcm", series / "echo2.dcm", SOPInstanceUID="1.2.826.0.1.3680043.8.498.99")
    expected = rf"^{re.escape(str(series))}: different instances at the same position .*: echo2.dcm, slice_003.dcm$"
    for read in (read_image, probe_image):  # a header fault: found before any pixel is read
        with pytest.raises(ImageReadError, match=expected):
            read(series)


@pytest.mark.parametrize("fault", ["missing", "shifted", "inserted"])
def test_uneven_slice_spacing_is_refused(tmp_path, fault):
    series, _, _ = _ct_series(tmp_path)
    if fault == "missing":
        (series / "slice_002.dcm").unlink()
    elif fault == "shifted":  # 5, 6.5, 3.5, 5, 5 mm: no gap wider than 1.5 steps
        _edit(series / "slice_002.dcm", ImagePositionPatient=[40.0, 30.0, 31.5])
    else:  # another instance half-way between two slices: 7 slices at 4.17 mm
        _edit(series / "slice_002.dcm", series / "extra.dcm", SOPInstanceUID="1.2.826.0.1.3680043.8.498.98")
        _edit(series / "extra.dcm", ImagePositionPatient=[40.0, 30.0, 32.5])
    with pytest.raises(ImageReadError, match=rf"{re.escape(str(series))}: slice spacing is not uniform: .* slice_00"):
        read_image(series)


def test_an_unreadable_dicom_file_spoils_only_its_own_series(tmp_path):
    # MR_truncated.dcm is MR_small.dcm (same series and SOPInstanceUID) cut short in its pixel data.
    from pydicom import dcmread

    header, whole = (dcmread(_pydicom_file(n), stop_before_pixels=True) for n in ("MR_truncated.dcm", "MR_small.dcm"))
    assert (header.SeriesInstanceUID, header.SOPInstanceUID) == (whole.SeriesInstanceUID, whole.SOPInstanceUID)
    ct_uid = dcmread(_pydicom_file("CT_small.dcm"), stop_before_pixels=True).SeriesInstanceUID
    both = tmp_path / "both"
    both.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm"):
        shutil.copy(_pydicom_file(name), both / name)
    images, ignored = list_images(both)
    assert sorted(images) == sorted(f"{both}{SERIES_SEP}{uid}" for uid in (ct_uid, whole.SeriesInstanceUID))
    assert ignored == []
    assert read_image(f"{both}{SERIES_SEP}{ct_uid}")[0].shape == (1, 128, 128)
    mr, meta = read_image(f"{both}{SERIES_SEP}{whole.SeriesInstanceUID}")  # from the whole copy
    assert mr.shape == (1, 64, 64) and meta["duplicates"] == ["MR_truncated.dcm"]

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(_pydicom_file("CT_small.dcm"), alone / "CT_small.dcm")
    shutil.copy(
        _pydicom_file("MR_truncated.dcm"), alone / "MR_truncated.dcm"
    )  # its header reads: an MR series of one broken file
    (alone / "cut.dcm").write_bytes(_pydicom_file("MR_small.dcm").read_bytes()[:600])  # its header does not
    images, ignored = list_images(alone)
    assert sorted(images) == sorted(f"{alone}{SERIES_SEP}{uid}" for uid in (ct_uid, whole.SeriesInstanceUID))
    assert ignored == [f"{alone / 'cut.dcm'}: unreadable DICOM header (no Rows or Columns: truncated, or not an image)"]
    assert read_image(f"{alone}{SERIES_SEP}{ct_uid}")[0].shape == (1, 128, 128)
    mr = f"{alone}{SERIES_SEP}{whole.SeriesInstanceUID}"
    with pytest.raises(ImageReadError, match=rf"^{re.escape(mr)}: unreadable DICOM pixel data in MR_truncated.dcm \("):
        read_image(mr)


def test_multi_frame_dicom_probe_matches_the_read(tmp_path):
    source = _pydicom_file("examples_ybr_color.dcm")  # ultrasound: 30 colour frames of 240 rows x 320 columns
    array, meta = read_image(source)
    assert array.shape == (3, 320, 240, 30)
    assert probe_image(source) == {"format": "dicom", "spatial_shape": (320, 240, 30), "channels": 3}
    (tmp_path / "us").mkdir()
    shutil.copy(source, tmp_path / "us" / "1.2.777.777.77.7.7777.7777.1")  # a UID for a name, as PACS exports
    images, ignored = list_images(tmp_path)
    assert len(images) == 1 and ignored == [] and read_image(images[0])[0].shape == (3, 320, 240, 30)


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


def _bilevel_png(path: Path, size: tuple[int, int]) -> Path:
    """A 1-bit PNG of ``size`` (width, height) with one filled rectangle: a few kB on disk."""
    img = Image.new("1", size, 0)
    ImageDraw.Draw(img).rectangle((10, 20, size[0] // 3, size[1] // 2), fill=1)
    img.save(path)
    return path


def test_max_voxels_not_pillows_limit_governs_png(tmp_path):
    from scripts.engine.screening import Screening

    # 14000 x 13000 = 182 M pixels: more than Pillow opens (2 x MAX_IMAGE_PIXELS = 179 M), within the
    # default max_voxels (268 M).
    path = _bilevel_png(tmp_path / "scan.png", (14000, 13000))
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert probe_image(path)["spatial_shape"] == (13000, 14000)
        array, _ = read_image(path)
    assert array.shape == (1, 13000, 14000) and array[0, 20, 10] and not array[0, 0, 0]
    del array
    assert Image.MAX_IMAGE_PIXELS == limit  # the rest of the process keeps Pillow's guard
    (failure,) = Screening([{"image": str(path)}], max_voxels=100_000_000).failures
    assert failure.startswith(f"{path}: 182,000,000 values") and "budget max_voxels=100,000,000" in failure


@pytest.mark.parametrize("name", ["small.png", "small.jpg"])
def test_pillows_hard_limit_does_not_apply(tmp_path, monkeypatch, name):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60 x 50 is above twice this: an error in Pillow
    Image.fromarray(np.full((50, 60, 3), 99, np.uint8)).save(tmp_path / name)
    assert probe_image(tmp_path / name)["spatial_shape"] == (50, 60)
    assert read_image(tmp_path / name)[0].shape == (3, 50, 60)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFileError, match="notes.txt: not a supported image file"):
        read_image(tmp_path / "notes.txt")
    for gone in ("gone.png", "gone", "gone.txt"):  # a missing file is missing, whatever its name
        with pytest.raises(ImageReadError, match=f"{gone}: no such file"):
            read_image(tmp_path / gone)
        with pytest.raises(ImageReadError, match=f"{gone}: no such file"):
            probe_image(tmp_path / gone)
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


def test_nifti_label_header_shows_the_label_not_the_sources_window(tmp_path):
    image = nib.Nifti1Image(np.zeros((20, 16, 5), np.int16), np.eye(4))
    image.header["cal_min"], image.header["cal_max"] = -1024, 3000  # a CT's display window
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    _, meta = read_image(tmp_path / "ct.nii.gz")
    label = np.zeros((20, 16, 5), np.int64)
    label[5:10, 4:8, 1:3] = 2
    written = nib.load(str(write_label(label, meta, tmp_path / "out")))
    header = written.header
    assert (header["cal_min"], header["cal_max"]) == (0, 2)
    assert (written.dataobj.slope, written.dataobj.inter) == (1.0, 0.0)
    assert header.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(written.dataobj), label)


def test_tiff_label_keeps_the_sources_pixel_size(tmp_path):
    stack = np.zeros((5, 30, 40), np.uint16)
    micron = (1000000, 325000)  # 1 / 0.325 um: pixels per unit, as a rational
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(
        ij, stack, imagej=True, resolution=(micron, micron), metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"}
    )
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, stack[0], resolution=((300, 1), (300, 1)), resolutionunit=2)  # 300 dpi
    for source, per_unit in ((ij, 1 / 0.325), (plain, 300.0)):
        _, meta = read_image(source)
        label = np.zeros(meta["spatial_shape"], np.int64)
        label[..., 3:9, 4:12] = 1
        with tifffile.TiffFile(write_label(label, meta, tmp_path / "out")) as tif:
            page = tif.pages[0]
            for tag in ("XResolution", "YResolution"):
                numerator, denominator = page.tags[tag].value
                assert numerator / denominator == pytest.approx(per_unit)
            if source == ij:
                assert tif.imagej_metadata["spacing"] == 2.0 and tif.imagej_metadata["unit"] == "um"
                assert tif.series[0].shape == (5, 30, 40) and np.array_equal(tif.asarray(), label)
            else:
                assert page.tags["ResolutionUnit"].value == 2 and np.array_equal(tif.asarray(), label)


def test_png_refuses_more_objects_than_16_bits_hold(tmp_path):
    Image.fromarray(np.zeros((256, 257), np.uint8)).save(tmp_path / "field.png")
    _, meta = read_image(tmp_path / "field.png")
    label = np.arange(256 * 257).reshape(256, 257) % 65536  # objects 0..65,535: the most a PNG holds
    back, _ = _roundtrip(label, meta, tmp_path / "out")
    assert np.array_equal(back[0], label)
    label[0, 0] = 65536  # one more: it would wrap round to background
    (tmp_path / "out" / "field_seg.png").unlink()
    with pytest.raises(ValueError, match=r"field.png: the label numbers 65,536 objects, more than a 16-bit PNG"):
        write_label(label, meta, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


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
