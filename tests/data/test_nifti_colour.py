"""NIfTI colour voxels (RGB24, RGBA32: one uint8 record per voxel) read as channels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.datasets import check_case
from scripts.data.io import probe_image, read_image

RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
RGBA32 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
AFFINE = np.diag([0.5, 0.7, 2.0, 1.0])


def _colour_nifti(path: Path, channels: np.ndarray, dtype: np.dtype) -> str:
    """(C, *spatial) uint8 -> a NIfTI of ``dtype`` records."""
    records = np.empty(channels.shape[1:], dtype)
    for name, values in zip(dtype.names, channels, strict=False):
        records[name] = values
    if "A" in dtype.names:
        records["A"] = 7
    nib.save(nib.Nifti1Image(records, AFFINE), path)
    return str(path)


@pytest.mark.parametrize("shape", [(32, 24), (16, 12, 5)])
@pytest.mark.parametrize("dtype", [RGB24, RGBA32], ids=["rgb24", "rgba32"])
def test_colour_voxels_are_three_channels(tmp_path, shape, dtype):
    rgb = np.random.default_rng(1).integers(0, 256, (3, *shape), dtype=np.uint8)
    path = _colour_nifti(tmp_path / "colour.nii.gz", rgb, dtype)
    image, meta = read_image(path)
    assert image.dtype == np.uint8 and np.array_equal(image, rgb)  # alpha dropped, as for PNG
    assert meta["spatial_shape"] == shape and np.allclose(meta["affine"], AFFINE, atol=1e-6)
    assert (meta["axial_axis"] is None) == (len(shape) == 2)
    assert probe_image(path) == {"format": "nifti", "spatial_shape": shape, "channels": 3}
    assert check_case({"image": path}, require_label=False) == []
