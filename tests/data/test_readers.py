"""Readers: what a file holds is read as viewers show it (palettes, bit depth, MINISWHITE, EXIF
orientation, alpha); labels keep their stored values; ambiguous or non-image files are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image, ImageOps

from scripts.data.datasets import load_datalist
from scripts.data.io import ImageReadError, list_images, probe_image, read_image, write_label
from scripts.data.transforms import LoadImageAnyd
from scripts.demo.synthetic import ct_case, write_dicom_series


def _pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not among pydicom's installed test files"
    return Path(path)


def _ramp(shape: tuple[int, int] = (30, 40)) -> np.ndarray:
    """An asymmetric gray pattern: any flip, transposition or inversion shows."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    return ((3 * x + 5 * y + x * y) % 256).astype(np.uint8)


# Palettes


def _palette_png(path: Path, indices: np.ndarray, colours: np.ndarray) -> Path:
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    img.putpalette(colours.astype(np.uint8).reshape(-1).tolist())
    img.save(path)
    return path


def test_palette_png_image_has_its_colours_and_a_label_its_indices(tmp_path):
    indices = (_ramp() // 8).astype(np.uint8)  # 32 entries
    gray = (255 - 8 * np.arange(256)).clip(0).astype(np.uint8)  # index 0 is white: indices run against the gray
    path = _palette_png(tmp_path / "gray.png", indices, np.repeat(gray[:, None], 3, axis=1))
    image, meta = read_image(path)
    assert image.shape == (1, 30, 40) and image.dtype == np.uint8 and meta["pil_mode"] == "P"
    assert np.array_equal(image[0], gray[indices])
    label, _ = read_image(path, as_label=True)
    assert np.array_equal(label[0], indices)

    colours = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)
    path = _palette_png(tmp_path / "voc.png", indices, colours)
    image, _ = read_image(path)
    assert image.shape == (3, 30, 40) and np.array_equal(image, np.moveaxis(colours[indices], -1, 0))
    assert probe_image(path)["channels"] == 3
    assert np.array_equal(read_image(path, as_label=True)[0][0], indices)
    # in the pipeline, the key `label` is read as a label
    loaded = LoadImageAnyd(["image", "label"])({"image": str(path), "label": str(path)})
    assert loaded["image"].shape == (3, 30, 40) and np.array_equal(loaded["label"][0].numpy(), indices)


def test_palette_tiff_image_has_its_colours_and_a_label_its_indices(tmp_path):
    indices = (_ramp() // 8).astype(np.uint8)
    gray = (255 - 8 * np.arange(256)).clip(0).astype(np.uint16)
    tifffile.imwrite(tmp_path / "gray.tif", indices, photometric="palette", colormap=np.tile(gray * 257, (3, 1)))
    image, _ = read_image(tmp_path / "gray.tif")
    assert image.shape == (1, 30, 40) and image.dtype == np.uint8 and np.array_equal(image[0], gray[indices])
    assert np.array_equal(read_image(tmp_path / "gray.tif", as_label=True)[0][0], indices)

    colours = np.random.default_rng(1).integers(0, 65536, (3, 256)).astype(np.uint16)  # 16-bit colours
    tifffile.imwrite(tmp_path / "colour.tif", indices, photometric="palette", colormap=colours)
    image, _ = read_image(tmp_path / "colour.tif")
    assert image.shape == (3, 30, 40) and image.dtype == np.uint16 and np.array_equal(image, colours[:, indices])
    assert probe_image(tmp_path / "colour.tif")["channels"] == 3
    assert np.array_equal(read_image(tmp_path / "colour.tif", as_label=True)[0][0], indices)


# Bit depth, MINISWHITE, alpha


def _deep_png(path: Path, data: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=True), str(path))
    assert path.read_bytes()[24] == 16  # IHDR: 16 bits per sample
    return path


@pytest.mark.parametrize("channels", [3, 4])  # RGB, and RGBA with its alpha left out
def test_16_bit_colour_png_keeps_its_depth(tmp_path, channels):
    data = np.random.default_rng(2).integers(0, 4096, (30, 40, channels)).astype(np.uint16)
    path = _deep_png(tmp_path / "deep.png", data)
    array, meta = read_image(path)
    assert array.dtype == np.uint16 and meta["source_dtype"] == "uint16"
    assert np.array_equal(array, np.moveaxis(data[..., :3], -1, 0))
    assert probe_image(path) == {"format": "png", "spatial_shape": (30, 40), "channels": 3}


def test_16_bit_gray_alpha_png_is_refused(tmp_path):
    path = _deep_png(tmp_path / "la.png", np.full((30, 40, 2), 4000, np.uint16))
    for read in (read_image, probe_image):
        with pytest.raises(ImageReadError, match=rf"{path}: 16-bit gray \+ alpha PNG, not readable at its full depth"):
            read(path)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.uint8, lambda d: 255 - d),
        (np.uint16, lambda d: 65535 - d),
        (np.int16, lambda d: -1 - d),
        (np.float32, lambda d: -d),
    ],
)
def test_miniswhite_tiff_is_inverted_for_an_image_not_for_a_label(tmp_path, dtype, expected):
    data = _ramp().astype(dtype) * (3 if dtype != np.uint8 else 1)
    tifffile.imwrite(tmp_path / "w.tif", data, photometric="miniswhite")
    image, _ = read_image(tmp_path / "w.tif")
    assert image.dtype == dtype and np.array_equal(image[0], expected(data))
    assert np.array_equal(read_image(tmp_path / "w.tif", as_label=True)[0][0], data)


def test_tiff_alpha_is_left_out(tmp_path):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 4000, (30, 40)).astype(np.uint16)
    alpha = np.full((30, 40), 65535, np.uint16)
    tifffile.imwrite(
        tmp_path / "la.tif", np.dstack([gray, alpha]), photometric="minisblack", extrasamples=["unassalpha"]
    )
    image, _ = read_image(tmp_path / "la.tif")
    assert image.shape == (1, 30, 40) and np.array_equal(image[0], gray)
    assert probe_image(tmp_path / "la.tif")["channels"] == 1
    rgb = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([rgb, alpha.astype(np.uint8)]), photometric="rgb")
    image, _ = read_image(tmp_path / "rgba.tif")
    assert image.shape == (3, 30, 40) and np.array_equal(image, np.moveaxis(rgb, -1, 0))
    assert probe_image(tmp_path / "rgba.tif")["channels"] == 3


# TIFF series and axes


def test_a_tiff_of_several_images_is_refused(tmp_path):
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((64, 96), np.uint16))
        tif.write(np.ones((32, 48), np.uint16))  # another image, not a reduced-resolution level
    for read in (read_image, probe_image):
        with pytest.raises(ImageReadError, match=rf"{path}: 2 image series in one TIFF"):
            read(path)


def test_a_pyramid_tiff_reads_its_full_resolution(tmp_path):
    full = np.random.default_rng(4).integers(0, 4000, (64, 96)).astype(np.uint16)
    with tifffile.TiffWriter(tmp_path / "pyramid.tif") as tif:
        tif.write(full, metadata=None)
        tif.write(full[::2, ::2], subfiletype=1, metadata=None)  # a reduced-resolution level
    image, _ = read_image(tmp_path / "pyramid.tif")
    assert image.shape == (1, 64, 96) and np.array_equal(image[0], full)


def test_explicit_tiff_axes_are_not_taken_for_channels(tmp_path):
    # 10 slices of 64 x 3: a narrow Z stack, not a 10 x 64 image with 3 channels
    data = np.random.default_rng(5).integers(0, 4000, (10, 64, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "zyx.tif", data, photometric="minisblack", metadata={"axes": "ZYX"})
    image, meta = read_image(tmp_path / "zyx.tif")
    assert image.shape == (1, 10, 64, 3) and meta["axial_axis"] == 0 and np.array_equal(image[0], data)
    assert probe_image(tmp_path / "zyx.tif")["spatial_shape"] == (10, 64, 3)


# EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_images_and_labels(tmp_path, orientation):
    stored = _ramp()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "x.png", exif=exif)
    with Image.open(tmp_path / "x.png") as img:
        shown = np.asarray(ImageOps.exif_transpose(img))  # what viewers show
    for as_label in (False, True):
        array, meta = read_image(tmp_path / "x.png", as_label=as_label)
        assert np.array_equal(array[0], shown)
    assert probe_image(tmp_path / "x.png")["spatial_shape"] == shown.shape
    # the written label is in the displayed orientation, with no EXIF left to turn it again
    label = (shown > 128).astype(np.uint8)
    path = write_label(label, meta, tmp_path / "out")
    assert np.array_equal(read_image(path, as_label=True)[0][0], label)
    with Image.open(path) as img:
        assert img.getexif().get(0x0112) is None


def test_exif_orientation_of_a_jpeg(tmp_path):
    rgb = np.dstack([_ramp(), np.flipud(_ramp()), np.fliplr(_ramp())])
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held upright: stored sideways
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "photo.jpg") as img:
        shown = np.asarray(ImageOps.exif_transpose(img))
    image, meta = read_image(tmp_path / "photo.jpg")
    assert image.shape == (3, 40, 30) and meta["spatial_shape"] == (40, 30)
    assert np.array_equal(np.moveaxis(image, 0, -1), shown)
    assert probe_image(tmp_path / "photo.jpg")["spatial_shape"] == (40, 30)


# NIfTI one voxel thick


@pytest.mark.parametrize("thin", [0, 1, 2])
def test_nifti_one_voxel_thick_along_any_axis_is_2d_and_written_back_as_stored(tmp_path, thin):
    sizes = [48, 40, 36]
    sizes[thin] = 1
    affine = np.array([[0.0, -0.7, 0, 10], [0.9, 0, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    data = np.random.default_rng(6).integers(0, 1000, sizes).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "slice.nii.gz"))
    plane = [a for a in range(3) if a != thin]
    image, meta = read_image(tmp_path / "slice.nii.gz")
    assert image.shape == (1, *(sizes[a] for a in plane)) and meta["axial_axis"] is None
    assert np.array_equal(image[0], data.reshape(image.shape[1:]))  # in-plane axes in the file's order
    assert probe_image(tmp_path / "slice.nii.gz")["spatial_shape"] == image.shape[1:]
    # the affine's first two columns step along the array's two axes (pixel spacing for HD95)
    assert np.allclose(np.linalg.norm(meta["affine"][:3, :2], axis=0), [np.linalg.norm(affine[:3, a]) for a in plane])
    label = (image[0] > 500).astype(np.uint8)
    path = write_label(label, meta, tmp_path / "out")
    written = nib.load(str(path))
    assert written.shape == tuple(sizes) and np.allclose(written.affine, affine)
    assert np.array_equal(np.asanyarray(written.dataobj), label.reshape(sizes))


def test_nifti_one_voxel_thick_with_channels_is_2d(tmp_path):
    data = np.random.default_rng(7).normal(size=(20, 1, 30, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "mc.nii.gz"))
    image, meta = read_image(tmp_path / "mc.nii.gz")
    assert image.shape == (2, 20, 30) and meta["axial_axis"] is None
    assert np.array_equal(image, np.moveaxis(data[:, 0], -1, 0))
    assert probe_image(tmp_path / "mc.nii.gz") == {"format": "nifti", "spatial_shape": (20, 30), "channels": 2}


# DICOM objects that are no image


def test_non_image_dicom_objects_are_left_out_of_a_folder(tmp_path, caplog):
    volume, _ = ct_case(np.random.default_rng(8), shape=(24, 20, 6))
    folder = tmp_path / "study"
    write_dicom_series(volume, np.diag([0.8, 0.8, 5.0, 1.0]), folder, seed=0)
    others = {
        "seg.dcm": "liver_1frame.dcm",
        "plan.dcm": "rtplan.dcm",
        "dose.dcm": "rtdose.dcm",
        "sr.dcm": "reportsi.dcm",
    }
    for name, source in others.items():
        shutil.copy(_pydicom_file(source), folder / name)
    images, ignored = list_images(tmp_path)
    assert len(images) == 1 and read_image(images[0])[0].shape == (1, 24, 20, 6)
    assert sorted(Path(i.split(": ")[0]).name for i in ignored) == sorted(others)
    assert all("not an image to segment" in i for i in ignored)
    with caplog.at_level("INFO"):
        assert [e["image"] for e in load_datalist(folder, "inference")] == [images[0]]
    assert "seg.dcm: not an image to segment: a DICOM SEG object" in caplog.text
    array, _ = read_image(folder)  # the folder's one image series, not '5 series in this folder'
    assert np.array_equal(array[0], volume)
    for name, kind in (("seg.dcm", "SEG"), ("plan.dcm", "RTPLAN"), ("dose.dcm", "RTDOSE"), ("sr.dcm", "SR")):
        for read in (read_image, probe_image):
            with pytest.raises(ImageReadError, match=rf"{folder / name}: not an image to segment: a DICOM {kind}"):
                read(folder / name)


def test_per_slice_rescaling_is_not_cut_to_integers(tmp_path):
    volume = np.full((20, 16, 4), 1001, np.int16)
    write_dicom_series(volume, np.diag([0.8, 0.8, 5.0, 1.0]), tmp_path / "s", seed=1)
    files = sorted((tmp_path / "s").iterdir())
    slopes, intercepts = [1.0, 0.5, 0.25, 2.5], [0.0, 0.0, -0.5, 3.0]
    for file, slope, intercept in zip(files, slopes, intercepts, strict=True):
        ds = pydicom.dcmread(file)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(file)
    array, _ = read_image(tmp_path / "s")
    expected = [1001 * s + i for s, i in zip(slopes, intercepts, strict=True)]  # 1001, 500.5, 249.75, 2505.5
    assert array.dtype.kind == "f" and np.allclose(array[0, 0, 0], expected)
    assert all(np.all(array[0, ..., k] == v) for k, v in enumerate(expected))
