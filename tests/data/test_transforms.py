"""SAM preprocessing and its inverse, intensity, channels, label classes, slice sampling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image

from scripts.data.transforms import (
    InvertSamInputd,
    LabelClassesd,
    LabelValueError,
    LoadImageAnyd,
    SamChannelsd,
    SamInputd,
    SamIntensityd,
    SampleSlicesd,
)
from scripts.model.sam import PIXEL_MEAN, PIXEL_STD


def _mt(array, **meta) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.asarray(array), dtype=torch.float32), meta=meta)


def test_ct_window():
    hu = _mt([[[-1000.0, -160.0, 40.0, 240.0, 1500.0]]], source_dtype="int16")
    out = SamIntensityd("image", mode="window")({"image": hu})["image"]
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.0, 127.5, 255.0, 255.0]))


def test_percentile_for_16_bit_and_auto():
    values = np.arange(10_000, dtype=np.float64).reshape(1, 100, 100) * 6  # 0 .. 59994
    out = SamIntensityd("image")({"image": _mt(values, source_dtype="uint16")})["image"]
    lo, hi = np.percentile(values, [1, 99])
    assert out.min() == 0 and out.max() == 255
    assert torch.isclose(out[0, 50, 0], torch.tensor((5000 * 6 - lo) / (hi - lo) * 255, dtype=torch.float32))
    rgb = _mt(np.full((3, 4, 4), 200.0), source_dtype="uint8")  # 8-bit stays as it is
    assert torch.equal(SamIntensityd("image")({"image": rgb})["image"], rgb.as_tensor())
    flat = SamIntensityd("image")({"image": _mt(np.full((1, 4, 4), 7.0), source_dtype="uint16")})["image"]
    assert torch.equal(flat, torch.zeros(1, 4, 4))


def test_percentile_is_per_channel():
    two = np.stack([np.linspace(0, 100, 400), np.linspace(0, 60000, 400)]).reshape(2, 20, 20)
    out = SamIntensityd("image", lower=0, upper=100)({"image": _mt(two, source_dtype="uint16")})["image"]
    assert torch.allclose(out[0], out[1], atol=1e-3)


def test_channels():
    gray = _mt(np.arange(12.0).reshape(1, 3, 4), filename_or_obj="g.tif")
    assert torch.equal(SamChannelsd()({"image": gray})["image"], gray.as_tensor().repeat(3, 1, 1))
    two = _mt(np.stack([np.ones((3, 4)), 2 * np.ones((3, 4))]))
    assert SamChannelsd()({"image": two})["image"][:, 0, 0].tolist() == [1.0, 2.0, 0.0]
    five = _mt(np.arange(5.0)[:, None, None] * np.ones((5, 3, 4)), filename_or_obj="stack.tif")
    with pytest.raises(ValueError, match="stack.tif: has 5 channels; choose 3 with `channels`"):
        SamChannelsd()({"image": five})
    assert SamChannelsd(channels=[4, 0, 2])({"image": five})["image"][:, 0, 0].tolist() == [4.0, 0.0, 2.0]


def test_label_classes_and_mapping():
    label = _mt([[[0, 255, 255, 0]]], filename_or_obj="mask.png")
    with pytest.raises(LabelValueError, match=r"mask.png: label values 255 are not among the declared classes \[1\]"):
        LabelClassesd()({"label": label})
    assert LabelClassesd(label_map={255: 1})({"label": label})["label"].tolist() == [[[0, 1, 1, 0]]]
    two = _mt([[[0, 128, 255]]])
    assert LabelClassesd(classes=[128, 255])({"label": two})["label"].tolist() == [[[0, 1, 2]]]
    rgb_mask = _mt(np.stack([[[0, 1]]] * 3))  # (3, 1, 2): the same mask in R, G and B
    assert LabelClassesd()({"label": rgb_mask})["label"].shape == (1, 1, 2)


def test_sam_input_2d_geometry_and_normalisation():
    image = _mt(np.full((3, 300, 260), 100.0))
    out = SamInputd("image", image_size=256)({"image": image})["image"]
    assert out.shape == (3, 256, 256)
    assert out.meta["sam_resized"] == (256, 222) and out.meta["sam_in_plane"] == (300, 260)
    expected = (100 - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    assert torch.allclose(out[:, 100, 100], expected)
    assert torch.equal(out[:, :, 222:], torch.zeros(3, 256, 34))  # padding is zero after normalising


def _disks(shape, rng, n=12, r=(5.5, 20.0)) -> np.ndarray:
    """Disks wider than 10 px and one bar 11 px wide."""
    label = np.zeros(shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        radius = rng.uniform(*r)
        cy, cx = rng.uniform(radius, shape[0] - radius), rng.uniform(radius, shape[1] - radius)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    label[shape[0] // 3 : shape[0] // 3 + 11, 10:-10] = 1
    return label


@pytest.mark.parametrize(
    ("shape", "size"), [((512, 512), 1024), ((520, 696), 1024), ((2048, 1536), 1024), ((700, 900), 256)]
)
def test_label_round_trip_keeps_dice(shape, size):
    label = _disks(shape, np.random.default_rng(sum(shape)))
    d = SamInputd("label", image_size=size, image_keys=())({"label": _mt(label[None])})
    assert d["label"].shape == (1, size, size)
    back = InvertSamInputd("label", ref_key="label")(d)["label"]
    assert back.shape == (1, *shape)
    mask = back[0].numpy() > 0.5
    dice = 2 * (mask & (label > 0)).sum() / (mask.sum() + label.sum())
    assert dice >= 0.99, dice


def test_volume_becomes_a_stack_of_slices_and_back():
    rng = np.random.default_rng(0)
    volume = np.zeros((1, 60, 40, 9))
    volume[0, :, :, 4] = _disks((60, 40), rng, n=3, r=(6, 10))
    meta = {"axial_axis": 2}
    d = SamInputd("label", image_size=128, image_keys=(), num_classes=1)({"label": _mt(volume, **meta)})
    assert d["label"].shape == (1, 9, 128, 128) and d["label"].meta["sam_slice_axis"] == 2
    assert d["label"][0, 4].sum() > 0 and d["label"][0, 3].sum() == 0
    back = InvertSamInputd("label", ref_key="label")(d)["label"]
    assert back.shape == (1, 60, 40, 9)
    assert ((back[0].numpy() > 0.5) == (volume[0] > 0)).mean() > 0.995
    other = SamInputd("label", image_size=128, image_keys=(), slice_axis=0)({"label": _mt(volume, **meta)})
    assert other["label"].shape == (1, 60, 128, 128)


def test_multi_class_labels_become_soft_class_channels():
    label = np.zeros((1, 64, 64))
    label[0, 10:30, 10:30] = 1
    label[0, 40:60, 40:60] = 2
    out = SamInputd("label", image_size=32, image_keys=(), num_classes=2)({"label": _mt(label)})["label"]
    assert out.shape == (2, 32, 32)
    assert out[0, 10, 10] == 1 and out[1, 10, 10] == 0 and out[1, 25, 25] == 1
    assert torch.isclose(out[0].sum(), torch.tensor(400 / 4), rtol=0.01)  # soft masks keep each class's area


def test_slice_sampling_prefers_foreground():
    volume = np.zeros((1, 20, 20, 50))
    volume[0, 5:10, 5:10, 30:33] = 1  # 3 of 50 slices hold foreground
    sampler = SampleSlicesd(num_samples=8, fg_fraction=0.75)
    sampler.set_random_state(0)
    samples = sampler({"image": _mt(volume.repeat(3, 0), axial_axis=2), "label": _mt(volume, axial_axis=2)})
    assert len(samples) == 8 and samples[0]["image"].shape == (3, 20, 20)
    indices = [s["label"].meta["slice_index"] for s in samples]
    assert sum(30 <= i < 33 for i in indices) >= 6
    assert all(s["label"].sum() > 0 for s in samples if 30 <= s["label"].meta["slice_index"] < 33)
    two_d = {"image": _mt(np.zeros((3, 8, 8))), "label": _mt(np.zeros((1, 8, 8)))}
    assert len(sampler(two_d)) == 1


def test_full_pipeline_from_files(tmp_path):
    stack = np.random.default_rng(1).integers(0, 4000, (6, 48, 64)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    mask = np.zeros((6, 48, 64), np.uint8)
    mask[2:4, 10:30, 20:40] = 255
    tifffile.imwrite(tmp_path / "mask.tif", mask, imagej=True, metadata={"axes": "ZYX"})
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "flat.png")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), str(tmp_path / "v.nii.gz"))
    pipeline = Compose(
        [
            LoadImageAnyd(["image", "label"]),
            LabelClassesd("label", label_map={255: 1}),
            SamIntensityd("image"),
            SamChannelsd("image"),
            SamInputd(["image", "label"], image_size=128),
        ]
    )
    d = pipeline({"image": str(tmp_path / "stack.tif"), "label": str(tmp_path / "mask.tif")})
    assert d["image"].shape == (3, 6, 128, 128) and d["label"].shape == (1, 6, 128, 128)
    assert d["image"].meta["filename_or_obj"] == str(tmp_path / "stack.tif")
    assert d["label"][0, 2].max() == 1 and d["label"][0, 0].max() == 0


def _prepare(image_size: int, **kw) -> Compose:
    """The inference preprocessing of 8-bit images (intensities kept as they are)."""
    return Compose(
        [
            LoadImageAnyd("image"),
            SamIntensityd("image", mode="none"),
            SamChannelsd("image"),
            SamInputd("image", image_size=image_size, **kw),
        ]
    )


@pytest.mark.parametrize("name", ["xray.dcm", "slide.nii.gz"])
def test_a_dicom_or_nifti_image_and_its_png_give_the_network_one_input(tmp_path, name):
    """DICOM and NIfTI arrays are read (x, y); the network sees them as displayed, like a PNG."""
    rows_cols = (np.arange(40 * 56).reshape(40, 56) % 251).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rows_cols), str(tmp_path / name))  # x along the columns
    Image.fromarray(rows_cols).save(tmp_path / "same.png")
    png = _prepare(64)({"image": str(tmp_path / "same.png")})["image"]
    seen = _prepare(64)({"image": str(tmp_path / name)})["image"]
    assert seen.shape == png.shape == (3, 64, 64) and seen.meta["sam_transposed"] and not png.meta["sam_transposed"]
    assert torch.equal(seen.as_tensor(), png.as_tensor())
    stored = _prepare(64, layout="stored")({"image": str(tmp_path / name)})["image"]  # as prompts of before saw it
    assert torch.allclose(stored.as_tensor(), png.as_tensor().transpose(-2, -1), atol=1e-5)


def test_nifti_volume_slices_reach_the_network_as_displayed(tmp_path):
    """A NIfTI volume (x, y, z) and the same voxels as a TIFF stack (z, rows = y, columns = x)."""
    xyz = np.random.default_rng(5).integers(0, 256, (20, 12, 5)).astype(np.uint8)
    nib.save(nib.Nifti1Image(xyz, np.eye(4)), str(tmp_path / "v.nii.gz"))
    tifffile.imwrite(tmp_path / "v.tif", xyz.transpose(2, 1, 0), imagej=True, metadata={"axes": "ZYX"})
    nifti = _prepare(32)({"image": str(tmp_path / "v.nii.gz")})["image"]
    tiff = _prepare(32)({"image": str(tmp_path / "v.tif")})["image"]
    assert nifti.shape == tiff.shape == (3, 5, 32, 32) and nifti.meta["sam_in_plane"] == (12, 20)
    assert torch.equal(nifti.as_tensor(), tiff.as_tensor())


@pytest.mark.parametrize("volume", [False, True])
@pytest.mark.parametrize("resize", [True, False])
@pytest.mark.parametrize("fmt", ["nifti", "dicom", "png"])
def test_round_trip_returns_the_input_grid(fmt, resize, volume):
    plane = _disks((60, 44), np.random.default_rng(3), n=4, r=(5.0, 9.0))
    plane[:, :3] = 1  # not symmetric under a transposition
    label = np.stack([plane, plane[::-1], np.zeros_like(plane)], axis=-1)[None] if volume else plane[None]
    meta = {"format": fmt, "axial_axis": 2 if volume else -1}
    to_sam = SamInputd("label", image_size=128 if resize else 32, image_keys=(), resize=resize)
    d = to_sam({"label": _mt(label, **meta)})
    net = d["label"][:, 0] if volume else d["label"]  # the (first) slice as the network sees it
    swapped = fmt != "png"
    assert d["label"].meta["sam_transposed"] == swapped
    if not resize:
        seen = plane.T if swapped else plane
        assert torch.equal(net[0, : seen.shape[0], : seen.shape[1]], torch.as_tensor(seen, dtype=torch.float32))
    back = InvertSamInputd("label", ref_key="label")(d)["label"]
    assert back.shape == label.shape
    if resize:
        mask, truth = back.numpy() > 0.5, label > 0
        assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) >= 0.99
    else:
        assert torch.equal(back, torch.as_tensor(label, dtype=torch.float32))


def test_a_png_label_of_a_nifti_image_reaches_the_network_with_its_image(tmp_path):
    """The label is put on the image's (x, y) grid; both are then swapped to display order alike."""
    rows_cols = np.zeros((40, 56), np.uint8)
    rows_cols[5:15, 30:50] = 200
    sitk.WriteImage(sitk.GetImageFromArray(rows_cols), str(tmp_path / "image.nii.gz"))
    Image.fromarray((rows_cols > 0).astype(np.uint8)).save(tmp_path / "mask.png")
    pipeline = Compose(
        [
            LoadImageAnyd(["image", "label"]),
            LabelClassesd("label"),
            SamIntensityd("image", mode="none"),
            SamChannelsd("image"),
            SamInputd(["image", "label"], image_size=56, resize=False),
        ]
    )
    d = pipeline({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "mask.png")})
    truth = torch.from_numpy(rows_cols > 0)
    assert torch.equal(d["label"][0, :40, :56] > 0.5, truth)
    assert torch.equal(d["image"][0, :40, :56] > 0, truth)
