"""Write a label map back in the input's own format and geometry, atomically.

NIfTI -> NIfTI (the input's affine and header), DICOM -> NIfTI in the series' geometry,
TIFF -> TIFF (uint8, or uint16 when a label exceeds 255), PNG/JPEG -> PNG. The output name is
the input's name with ``_seg`` (``case.nii.gz`` -> ``case_seg.nii.gz``). Every file is
written to a temporary name beside its target and renamed, so an interrupted run never
leaves a half-written file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...common.files import atomic_write
from .formats import output_stem

_EXTENSION = {"nifti": ".nii.gz", "dicom": ".nii.gz", "tiff": ".tif", "png": ".png", "jpeg": ".png"}


def output_path(meta: Mapping[str, Any], output_dir: str | Path, postfix: str = "seg") -> Path:
    return Path(output_dir) / f"{output_stem(meta['filename_or_obj'])}_{postfix}{_EXTENSION[meta['format']]}"


def label_dtype(label: np.ndarray) -> type:
    top = int(label.max()) if label.size else 0
    if top > np.iinfo(np.uint16).max:
        return np.int32
    return np.uint8 if top <= 255 else np.uint16


def _as_stored(label: np.ndarray, affine: np.ndarray, meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI input one voxel thick was read as 2D (its thin axis dropped, that axis's affine column
    moved last): put the thin axis back where the input stores it, so the label has the input's shape and affine."""
    shape = tuple(int(s) for s in meta.get("nifti_shape", label.shape))
    if label.ndim != 2 or len(shape) != 3:
        return label, affine
    thin = shape.index(1)
    plane = [a for a in range(3) if a != thin]
    stored = affine.copy()
    stored[:, [*plane, thin]] = affine[:, :3]
    return label.reshape(shape), stored


def _write_nifti(label: np.ndarray, meta: Mapping[str, Any], path: Path) -> None:
    import nibabel as nib

    label, affine = _as_stored(label, np.asarray(meta["affine"], dtype=np.float64), meta)
    header = None
    if meta["format"] == "nifti":
        try:
            header = nib.load(meta["filename_or_obj"]).header.copy()
        except Exception:  # the source went away: write with the affine alone
            header = None
    image = nib.Nifti1Image(label, affine, header=header)
    image.set_data_dtype(label.dtype)
    image.header.set_slope_inter(1, 0)
    nib.save(image, str(path))


def _write_tiff(label: np.ndarray, meta: Mapping[str, Any], path: Path) -> None:
    import tifffile

    axes = "ZYX" if label.ndim == 3 else "YX"
    tifffile.imwrite(path, label, metadata={"axes": axes}, compression="zlib")


def _write_png(label: np.ndarray, meta: Mapping[str, Any], path: Path) -> None:
    from PIL import Image

    if label.dtype == np.uint8:
        Image.fromarray(label, mode="L").save(path, format="PNG")
    else:
        Image.fromarray(label.astype(np.uint16)).save(path, format="PNG")


def write_label(
    label: np.ndarray, meta: Mapping[str, Any], output_dir: str | Path, postfix: str = "seg", path: Path | None = None
) -> Path:
    """Write ``label`` (the input's spatial shape, no channel axis) into ``output_dir``
    (at ``path`` if given, else at ``output_path``)."""
    label = np.asarray(label)
    if tuple(label.shape) != tuple(meta["spatial_shape"]):
        raise ValueError(
            f"{meta['filename_or_obj']}: label shape {label.shape} differs from the image's {meta['spatial_shape']}"
        )
    label = label.astype(label_dtype(label))
    fmt = meta["format"]
    writer = {"nifti": _write_nifti, "dicom": _write_nifti, "tiff": _write_tiff}.get(fmt, _write_png)
    if fmt in ("png", "jpeg") and label.ndim != 2:
        raise ValueError(f"{meta['filename_or_obj']}: a {fmt.upper()} label must be 2D, got {label.shape}")
    path = path or output_path(meta, output_dir, postfix)
    return atomic_write(path, lambda tmp: writer(label, meta, tmp))
