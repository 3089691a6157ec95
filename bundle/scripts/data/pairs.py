"""An image and its label on one voxel grid, checked before any pixel of the pair is compared.

Equal shapes do not make a label's voxels its image's:

- 2D NIfTI and DICOM arrays are read (x, y), columns first; PNG, JPEG and TIFF arrays are
  (rows, columns). A 2D label in the other convention is transposed: x is the column and y the
  row, as DICOM, ITK and QuPath have it.
- Two files with an affine (NIfTI, DICOM) may store one grid in another axis order or
  direction (an image stored LPS, its label saved RAS by ``nib.as_closest_canonical``). Such a
  label is permuted and flipped onto the image's grid, which is exact; a label on any other
  grid is refused, naming both files and their orientations.

A volume paired across the two kinds (a TIFF stack and a NIfTI) has no affine to compare and
is taken as stored: only its shape is checked.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .io.formats import COLUMNS_FIRST

_GRID_TOL = 0.1  # voxel centres this far apart (in the image's smallest voxel size) are the same


class LabelGridError(ValueError):
    """A label whose voxels are not its image's, with both files in the message."""


def label_on_image_grid(
    label: np.ndarray, label_meta: Mapping[str, Any], image_meta: Mapping[str, Any]
) -> tuple[np.ndarray, dict]:
    """``label`` (C, *spatial) as read, on the grid of the image ``image_meta`` describes (both
    from ``read_image``): the label's array and metadata, whose geometry is now the image's."""
    name = label_meta["filename_or_obj"]
    shape = tuple(image_meta["spatial_shape"])
    mixed = (label_meta["format"] in COLUMNS_FIRST) != (image_meta["format"] in COLUMNS_FIRST)
    if mixed and label.ndim == 3 and len(shape) == 2:
        label = label.transpose(0, 2, 1)
    elif not mixed and label_meta["format"] in COLUMNS_FIRST:
        label = _reoriented(label, label_meta, image_meta)
    if tuple(label.shape[1:]) != shape:
        hint = ""
        if mixed and label.ndim == 3 and tuple(label.shape[:0:-1]) == shape:
            hint = (
                f"; a 2D {label_meta['format'].upper()} label of a {image_meta['format'].upper()} image is read "
                "with the image's x along its columns, so this one's rows run along x: save it transposed"
            )
        raise LabelGridError(f"{name}: label shape {tuple(label.shape[1:])} differs from image shape {shape}{hint}")
    geometry = {k: image_meta[k] for k in ("affine", "spatial_shape", "axial_axis") if k in image_meta}
    return np.ascontiguousarray(label), {**label_meta, **geometry}


def _corners(shape: Sequence[int]) -> np.ndarray:
    """Homogeneous voxel coordinates (4, 2**n) of the grid's corners; a 2D grid lies at z = 0."""
    ends = [(0, n - 1) for n in shape] + [(0,)] * (3 - len(shape))
    return np.array([[*c, 1.0] for c in itertools.product(*ends)]).T


def _offset(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """How far apart (mm) two affines put one voxel of the grid, at most: at a corner, as they are linear."""
    corners = _corners(shape)
    return float(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0).max())


def _same_grid(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> bool:
    voxel = np.linalg.norm(b[:3, : len(shape)], axis=0).min()
    return _offset(a, b, shape) <= _GRID_TOL * voxel


def _reoriented(label: np.ndarray, label_meta: Mapping[str, Any], image_meta: Mapping[str, Any]) -> np.ndarray:
    """A label with its own affine, permuted and flipped onto the image's grid where that puts
    every voxel on its partner; refused otherwise."""
    from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    affine, image_affine = np.asarray(label_meta["affine"]), np.asarray(image_meta["affine"])
    shape = image_meta["spatial_shape"]
    if _same_grid(affine, image_affine, shape):
        return label
    volume = label if label.ndim == 4 else label[..., None]  # a 2D grid: its one-voxel z axis
    moved_affine = affine
    try:
        transform = ornt_transform(io_orientation(affine), io_orientation(image_affine))
    except ValueError:  # a degenerate affine: no orientation to match
        transform = None
    if transform is not None:
        moved = np.moveaxis(apply_orientation(np.moveaxis(volume, 0, -1), transform), -1, 0)
        moved_affine = affine @ inv_ornt_aff(transform, volume.shape[1:])
        if _same_grid(moved_affine, image_affine, shape) and (label.ndim == 4 or moved.shape[-1] == 1):
            return moved if label.ndim == 4 else moved[..., 0]
    codes = ["".join(c or "?" for c in aff2axcodes(a)) for a in (affine, image_affine)]
    raise LabelGridError(
        f"{label_meta['filename_or_obj']}: not on the voxel grid of its image {image_meta['filename_or_obj']}: "
        f"the label's affine is {codes[0]} oriented, the image's {codes[1]}, and they place voxels up to "
        f"{_offset(moved_affine, image_affine, shape):.3g} mm apart; save the label with the image's affine"
    )
