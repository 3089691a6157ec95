"""From logits to label files: thresholds, instance labels, writing in the input's format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from scripts.data.io import read_image
from scripts.data.postprocess import (
    InstanceLabelsd,
    LogitsToLabeld,
    WriteLabeld,
    instance_labels,
    logits_to_label,
    voxel_spacing,
)
from scripts.data.transforms import InvertSamInputd, LoadImageAnyd, SamChannelsd, SamInputd, SamIntensityd


def test_logits_to_label():
    logits = torch.tensor([[[2.0, -1.0, 0.5, -3.0]], [[1.0, 3.0, -0.5, -2.0]]])  # 2 classes, 1 x 4
    assert logits_to_label(logits).tolist() == [[[1.0, 2.0, 1.0, 0.0]]]


def _touching_disks() -> np.ndarray:
    yy, xx = np.mgrid[:64, :96]
    label = ((yy - 32) ** 2 + (xx - 30) ** 2 <= 15**2) | ((yy - 32) ** 2 + (xx - 56) ** 2 <= 15**2)
    out = label.astype(np.int64)
    out[5:10, 80:90] = 2
    out[50:55, 80:90] = 2
    return out


def test_instance_labels_count_objects_per_class():
    label = _touching_disks()
    plain = instance_labels(label)
    assert sorted(np.unique(plain)) == [0, 1, 2, 3]  # the touching disks are one component
    split = instance_labels(label, split_touching=True)
    assert sorted(np.unique(split)) == [0, 1, 2, 3, 4]
    assert ((split > 0) == (label > 0)).all()
    left, right = split[32, 20], split[32, 66]
    assert left != right and left > 0 and right > 0


def test_instance_labels_in_3d():
    volume = np.zeros((10, 20, 20), np.int64)
    volume[1:4, 2:6, 2:6] = 1
    volume[6:9, 10:15, 10:15] = 1
    assert instance_labels(volume).max() == 2


CT_SPACING = (0.7, 0.7, 5.0)  # mm: fine in-plane, coarse between slices


def _spheres_in_mm(centres_z: tuple[float, ...], radius: float = 12.0) -> np.ndarray:
    """Balls of ``radius`` mm on a (x, y, z) grid of ``CT_SPACING``, centred in-plane, at ``centres_z`` mm."""
    x, y, z = (np.arange(n) * s for n, s in zip((50, 50, 12), CT_SPACING, strict=True))
    x, y, z = np.meshgrid(x - x.mean(), y - y.mean(), z, indexing="ij")
    return np.any([x**2 + y**2 + (z - c) ** 2 <= radius**2 for c in centres_z], axis=0).astype(np.int64)


def test_touching_objects_are_split_in_physical_space():
    # Two 12 mm balls 20 mm apart along the slices, joined by a 6.6 mm neck: two objects in the
    # body. In voxels they are pancakes 2-3 slices thick stacked into one, deepest at the neck.
    label = _spheres_in_mm((15.0, 35.0))
    assert instance_labels(label).max() == 1  # one connected component
    assert instance_labels(label, split_touching=True).max() == 1  # voxels: not split
    split = instance_labels(label, split_touching=True, spacing=CT_SPACING)
    assert split.max() == 2 and ((split > 0) == (label > 0)).all()
    assert split[25, 25, 3] != split[25, 25, 7]  # the balls' centres: one object each
    for alone in (15.0, 35.0):  # each ball alone stays whole
        assert instance_labels(_spheres_in_mm((alone,)), split_touching=True, spacing=CT_SPACING).max() == 1
    # the transform reads the spacing from the image's affine
    affine = torch.diag(torch.tensor([*CT_SPACING, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.zeros(1, *label.shape), affine=affine)
    d = {"image": image, "pred": torch.from_numpy(label[None].astype(np.float32))}
    assert voxel_spacing(image.meta, 3) == pytest.approx(CT_SPACING)
    instances = InstanceLabelsd("pred", split_touching=True)
    assert instances(d)["pred"].max() == 2
    assert instances({**d, "image": MetaTensor(image.as_tensor())})["pred"].max() == 1  # no geometry: voxels


def test_equal_spacing_splits_as_voxels_do():
    label = _touching_disks()
    voxels = instance_labels(label, split_touching=True)
    assert np.array_equal(instance_labels(label, split_touching=True, spacing=(0.5, 0.5)), voxels)
    assert np.array_equal(instance_labels(label, split_touching=True, spacing=(1.0, 1.0)), voxels)


def test_prediction_written_in_the_inputs_geometry(synthetic, tmp_path):
    source = str(synthetic / "ct/imagesTr/ct_000.nii.gz")
    d = Compose(
        [
            LoadImageAnyd("image"),
            SamIntensityd("image", mode="window"),
            SamChannelsd("image"),
            SamInputd("image", image_size=128),
        ]
    )({"image": source})
    organ, _ = read_image(source.replace("imagesTr", "labelsTr"))
    # Stand-in logits: the truth itself, sent into SAM's geometry, as a network output would be.
    truth = SamInputd("label", image_size=128, image_keys=())(
        {"label": LoadImageAnyd("label")({"label": source.replace("imagesTr", "labelsTr")})["label"]}
    )["label"]
    d["pred"] = (truth.as_tensor() - 0.5) * 20
    out = Compose(
        [
            InvertSamInputd("pred"),
            LogitsToLabeld("pred"),
            InstanceLabelsd("pred"),
            WriteLabeld("pred", output_dir=str(tmp_path)),
        ]
    )(d)
    written, meta = read_image(out["pred_path"])
    _, image_meta = read_image(source)
    assert out["pred_path"].endswith("ct_000_seg.nii.gz")
    assert written.shape == organ.shape and np.allclose(meta["affine"], image_meta["affine"])
    dice = 2 * ((written > 0) & (organ > 0)).sum() / ((written > 0).sum() + (organ > 0).sum())
    assert dice > 0.98


def test_slice_batch_inferer_equals_one_slice_at_a_time():
    from scripts.engine.inferers import SliceBatchInferer

    calls = []

    def network(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.stack([x.sum(1), -x.mean(1)], dim=1)  # (b, 2, S, S): depends on each slice only

    volume = torch.randn(2, 3, 7, 16, 16)
    batched = SliceBatchInferer(batch_size=4)(volume, network)
    assert batched.shape == (2, 2, 7, 16, 16) and calls == [4, 4, 4, 2]
    for b in range(2):
        for k in range(7):
            assert torch.allclose(batched[b, :, k], network(volume[b : b + 1, :, k])[0])
    image = torch.randn(2, 3, 16, 16)
    assert torch.equal(SliceBatchInferer()(image, network), network(image))


def test_native_scale_sliding_window_covers_large_images_in_network_sized_tiles():
    from scripts.engine.inferers import make_inferer

    sizes = []

    def network(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape[-2:]))
        return x[:, :1] * 2  # one class, a pixel-wise function: tiles must blend back exactly

    image = torch.rand(1, 3, 600, 410)
    out = make_inferer("native", image_size=256, batch_size=4)(image, network)
    assert out.shape == (1, 1, 600, 410) and set(sizes) == {(256, 256)}
    assert torch.allclose(out, image[:, :1] * 2, atol=1e-5)
    volume = torch.rand(1, 3, 3, 300, 280)
    assert make_inferer("native", image_size=256)(volume, network).shape == (1, 1, 3, 300, 280)
    assert make_inferer("resize", image_size=256)(torch.rand(2, 3, 256, 256), network).shape == (2, 1, 256, 256)


def test_native_scale_input_keeps_the_image_size():
    image = MetaTensor(torch.rand(3, 600, 410) * 255)
    out = SamInputd("image", image_size=256, resize=False)({"image": image})["image"]
    assert out.shape == (3, 600, 410) and out.meta["sam_resized"] == (600, 410)
    small = SamInputd("image", image_size=256, resize=False)({"image": MetaTensor(torch.rand(3, 100, 300))})["image"]
    assert small.shape == (3, 256, 300)  # padded to at least one network-sized tile
