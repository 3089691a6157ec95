"""Write a label map back in the input's own format and geometry, atomically.

NIfTI -> NIfTI (the input's affine and header, its display range the label's), DICOM -> NIfTI
in the series' geometry, TIFF -> TIFF with the input's pixel size (uint8, or uint16 when a label
exceeds 255), PNG/JPEG -> PNG (up to 65,535 objects). The output name is
the input's name with ``_seg`` (``case.nii.gz`` -> ``case_seg.nii.gz``). Every file is
written to a temporary name beside its target and renamed, so an interrupted run never
leaves a half-written file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...common.files import atomic_write
from .formats import output_stem

_EXTENSION = {"nifti": ".nii.gz", "dicom": ".nii.gz", "tiff": ".tif", "png": ".png", "jpeg": ".png"}


OUTPUT_POSTFIX = "seg"  # a prediction of ``case.png`` is ``case_seg.png`` (``case_seg_2.png`` for a second ``case``)


def output_path(meta: Mapping[str, Any], output_dir: str | Path, postfix: str = OUTPUT_POSTFIX) -> Path:
    return Path(output_dir) / f"{output_stem(meta['filename_or_obj'])}_{postfix}{_EXTENSION[meta['format']]}"


def predicted_stem(stem: str) -> str | None:
    """The input stem a file of ``stem`` would be the prediction of (``case_seg``, ``case_seg_2``:
    ``case``), None for a stem no prediction has."""
    found = re.fullmatch(rf"(.+)_{OUTPUT_POSTFIX}(_\d+)?", stem)
    return found.group(1) if found else None


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
    # The source's display window (a CT's -1024..3000) would show a 0/1 label black.
    image.header["cal_min"], image.header["cal_max"] = 0, int(label.max()) if label.size else 0
    nib.save(image, str(path))


def _tiff_calibration(source: str) -> tuple[dict, dict | None]:
    """The source TIFF's pixel size: its resolution tags as ``tifffile.imwrite`` keywords, and
    ImageJ's ``spacing`` and ``unit`` (None where the source is no ImageJ file)."""
    import tifffile

    try:
        with tifffile.TiffFile(source) as tif:
            tags, imagej = tif.pages[0].tags, tif.imagej_metadata
            x, y = (tags[k].value if k in tags else None for k in ("XResolution", "YResolution"))
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
    except Exception:  # the source went away: the label without its pixel size
        return {}, None
    resolution = {}
    if x and y and all(x) and all(y):  # rationals (numerator, denominator), neither 0
        resolution = {"resolution": (tuple(x), tuple(y))}
        if unit is not None:
            resolution["resolutionunit"] = int(unit)
    calibration = None if imagej is None else {k: imagej[k] for k in ("spacing", "unit") if k in imagej}
    return resolution, calibration


def _write_tiff(label: np.ndarray, meta: Mapping[str, Any], path: Path) -> None:
    import tifffile

    axes = "ZYX" if label.ndim == 3 else "YX"
    resolution, imagej = _tiff_calibration(str(meta["filename_or_obj"]))
    if imagej is not None and label.dtype != np.int32:  # ImageJ files hold 8 and 16 bits, not 32
        metadata = {"axes": axes, **imagej}
        tifffile.imwrite(path, label, imagej=True, metadata=metadata, compression="zlib", **resolution)
    else:
        tifffile.imwrite(path, label, metadata={"axes": axes}, compression="zlib", **resolution)


def _write_png(label: np.ndarray, meta: Mapping[str, Any], path: Path) -> None:
    from PIL import Image

    if label.dtype == np.uint8:
        Image.fromarray(label, mode="L").save(path, format="PNG")
    else:
        Image.fromarray(label.astype(np.uint16)).save(path, format="PNG")


def _check_png(label: np.ndarray, meta: Mapping[str, Any]) -> None:
    source = meta["filename_or_obj"]
    if label.ndim != 2:
        raise ValueError(f"{source}: a {meta['format'].upper()} label must be 2D, got {label.shape}")
    top = int(label.max()) if label.size else 0
    if top > np.iinfo(np.uint16).max:  # a 16-bit PNG would wrap object 65,536 round to background
        raise ValueError(
            f"{source}: the label numbers {top:,} objects, more than a 16-bit PNG holds (65,535); "
            "give the image as TIFF or NIfTI, or write class labels (instance_labels: false)"
        )


def write_label(
    label: np.ndarray,
    meta: Mapping[str, Any],
    output_dir: str | Path,
    postfix: str = OUTPUT_POSTFIX,
    path: Path | None = None,
) -> Path:
    """Write ``label`` (the input's spatial shape, no channel axis) into ``output_dir``
    (at ``path`` if given, else at ``output_path``)."""
    label = np.asarray(label)
    if tuple(label.shape) != tuple(meta["spatial_shape"]):
        raise ValueError(
            f"{meta['filename_or_obj']}: label shape {label.shape} differs from the image's {meta['spatial_shape']}"
        )
    fmt = meta["format"]
    if fmt in ("png", "jpeg"):
        _check_png(label, meta)
    label = label.astype(label_dtype(label))
    writer = {"nifti": _write_nifti, "dicom": _write_nifti, "tiff": _write_tiff}.get(fmt, _write_png)
    path = path or output_path(meta, output_dir, postfix)
    return atomic_write(path, lambda tmp: writer(label, meta, tmp))
