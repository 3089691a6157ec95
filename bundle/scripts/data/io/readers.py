"""Read any supported image into one form: a channel-first array and its metadata.

``read_image(path)`` returns ``(array, meta)``: ``array`` is ``(C, H, W)`` for 2D images and
``(C, d0, d1, d2)`` for volumes, in the file's own data type; ``meta`` holds the file name,
format, spatial shape, a 4 x 4 RAS ``affine`` (identity for formats without geometry) and
``axial_axis``: the spatial axis along which a volume is cut into 2D slices by default.
``probe_image(path)`` reads headers only, so budgets are checked before any pixel is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .formats import SERIES_SEP, detect_format, is_supported, looks_like_dicom, split_series

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ImageReadError(ValueError):
    """A file that cannot be read as an image, with the file and the reason in the message."""


def _fail(path: Any, problem: str) -> ImageReadError:
    return ImageReadError(f"{path}: {problem}")


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _meta(path: Any, fmt: str, array: np.ndarray, affine: np.ndarray | None, axial_axis: int | None, **extra) -> dict:
    return {
        "filename_or_obj": str(path),
        "format": fmt,
        "spatial_shape": tuple(int(s) for s in array.shape[1:]),
        "affine": np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64),
        "axial_axis": axial_axis,
        "source_dtype": str(array.dtype),
        **extra,
    }


def axial_axis_of(affine: np.ndarray) -> int:
    """The voxel axis that runs most nearly along the body's superior-inferior (world z) axis."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.maximum(np.linalg.norm(affine[:3, :3], axis=0), 1e-12)))


# NIfTI


def _read_nifti(path: Path) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # applies the scaling; reads everything
    except Exception as err:  # truncated .nii.gz raises EOFError, OSError or zlib errors
        raise _fail(path, f"unreadable NIfTI file ({_reason(err)})") from err
    if data.ndim == 2:
        array, axial = data[None], None
    elif data.ndim == 3 and data.shape[2] == 1:
        array, axial = data[None, :, :, 0], None
    elif data.ndim == 3:
        array, axial = data[None], axial_axis_of(img.affine)
    elif data.ndim == 4:  # a 4th axis is channels (MONAI's convention, e.g. multi-sequence MR)
        array, axial = np.moveaxis(data, 3, 0), axial_axis_of(img.affine)
    else:
        raise _fail(path, f"unsupported NIfTI dimensionality {data.shape}: 2D, 3D or 3D + channels expected")
    return array, _meta(path, "nifti", array, img.affine, axial)


def _probe_nifti(path: Path) -> tuple[tuple[int, ...], int]:
    import nibabel as nib

    try:
        shape = tuple(nib.load(str(path)).shape)
    except Exception as err:
        raise _fail(path, f"unreadable NIfTI file ({_reason(err)})") from err
    channels = shape[3] if len(shape) == 4 else 1
    return tuple(s for s in shape[:3] if s != 1) or shape[:2], channels


# DICOM


def dicom_series_in(folder: Path) -> list[str]:
    """``folder::uid`` for every DICOM series directly in ``folder`` (grouped by SeriesInstanceUID)."""
    return [f"{folder}{SERIES_SEP}{uid}" for uid in _series_ids(folder)]


def _series_ids(folder: Path) -> list[str]:
    import SimpleITK as sitk

    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as err:  # GDCM gives up on malformed files
        raise _fail(folder, f"cannot scan the DICOM files of this folder ({_reason(err)})") from err


def series_files(path: Any) -> list[str]:
    import SimpleITK as sitk

    folder, uid = split_series(path)
    if folder.is_file():
        return [str(folder)]
    if uid is None:
        uids = _series_ids(folder)
        if len(uids) != 1:
            found = f"{len(uids)} series" if uids else "no DICOM series"
            raise _fail(path, f"{found} in this folder; name one as '{folder}{SERIES_SEP}<SeriesInstanceUID>'")
        uid = uids[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    if not files:
        raise _fail(path, f"no DICOM series {uid} in {folder}")
    return list(files)


def _sitk_affine(image: Any) -> np.ndarray:
    """RAS affine of a SimpleITK image, for the array transposed to (x, y, z) index order."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())[None, :]
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def _unparsed_files(folder: Path) -> list[str]:
    """DICOM-looking files of ``folder`` that belong to no series: GDCM skipped them as broken."""
    in_series = {str(Path(f)) for f in _all_series_files(folder)}
    return sorted(str(f) for f in folder.iterdir() if looks_like_dicom(f) and str(f) not in in_series)


def _all_series_files(folder: Path) -> list[str]:
    import SimpleITK as sitk

    return [f for uid in _series_ids(folder) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]


def _check_spacing(reader: Any, image: Any, path: Any) -> None:
    """Refuse a series with missing slices: GDCM would stack the rest as if nothing were lost."""
    if not all(reader.HasMetaDataKey(i, "0020|0032") for i in range(image.GetSize()[2])):
        return
    normal = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    positions = [np.array(reader.GetMetaData(i, "0020|0032").split("\\"), float) for i in range(image.GetSize()[2])]
    gaps = np.diff(np.sort([p @ normal for p in positions]))
    if gaps.size > 1 and gaps.max() > 1.5 * np.median(gaps):
        gap, step = gaps.max(), np.median(gaps)
        raise _fail(path, f"missing slices: a gap of {gap:.2f} mm where slices lie {step:.2f} mm apart")


def _read_dicom(path: Any) -> tuple[np.ndarray, dict]:
    import SimpleITK as sitk

    files = series_files(path)
    folder = split_series(path)[0]
    if folder.is_dir():
        broken = _unparsed_files(folder)
        if broken:
            names = ", ".join(Path(f).name for f in broken[:3]) + (" ..." if len(broken) > 3 else "")
            raise _fail(path, f"{len(broken)} DICOM file(s) of this folder are unreadable (truncated?): {names}")
    try:
        if len(files) == 1:
            image = sitk.ReadImage(files[0])
            tags = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            image = reader.Execute()
            _check_spacing(reader, image, path)
            tags = {k: reader.GetMetaData(0, k) for k in reader.GetMetaDataKeys(0)}
        data = sitk.GetArrayFromImage(image)  # z, y, x (and components last)
    except ImageReadError:
        raise
    except Exception as err:  # truncated pixel data, not DICOM, unreadable
        raise _fail(path, f"unreadable DICOM ({_reason(err)})") from err
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
        data = data[None]
    if image.GetNumberOfComponentsPerPixel() > 1:  # colour DICOM: z, y, x, c
        data = np.moveaxis(data, -1, 0)
    else:
        data = data[None]
    array = np.ascontiguousarray(np.transpose(data, (0, 3, 2, 1)))  # C, x, y, z
    affine = _sitk_affine(image)
    modality = tags.get("0008|0060", "").strip()
    if array.shape[3] == 1:
        array, axial = array[..., 0], None
    else:
        axial = axial_axis_of(affine)
    return array, _meta(path, "dicom", array, affine, axial, modality=modality, n_files=len(files))


def _probe_dicom(path: Any) -> tuple[tuple[int, ...], int]:
    import SimpleITK as sitk

    files = series_files(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except Exception as err:
        raise _fail(path, f"unreadable DICOM ({_reason(err)})") from err
    size = tuple(reader.GetSize()[:2])
    shape = size + ((len(files),) if len(files) > 1 else ())
    return shape, reader.GetNumberOfComponents()


# TIFF


def _tiff_layout(axes: str, shape: tuple[int, ...], path: Any) -> tuple[list[int], int | None, int | None]:
    """Positions of (Y, X), the channel axis and the depth axis in a tifffile series."""
    keep = [i for i, (a, s) in enumerate(zip(axes, shape, strict=True)) if s > 1 or a in "YX"]
    axes = "".join(axes[i] for i in keep)
    sizes = [shape[i] for i in keep]
    if len(axes) >= 3 and axes.endswith("YX") and sizes[-1] <= 4 < min(sizes[-3], sizes[-2]):
        # (H, W, C) written as pages of H x C: the last axis holds channels.
        axes = axes[:-3] + "YXC"
    channel = [keep[i] for i, a in enumerate(axes) if a in "CS"]
    depth = [keep[i] for i, a in enumerate(axes) if a not in "CSYX"]
    if len(channel) > 1 or len(depth) > 1 or "Y" not in axes or "X" not in axes:
        raise _fail(
            path,
            f"unsupported TIFF dimensionality: shape {tuple(shape)} with axes {axes!r}; "
            "2D, multi-channel 2D or one Z stack expected",
        )
    yx = [keep[i] for i, a in enumerate(axes) if a in "YX"]
    return yx, (channel[0] if channel else None), (depth[0] if depth else None)


def _read_tiff(path: Path) -> tuple[np.ndarray, dict]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, data = series.axes, series.asarray()
    except Exception as err:
        raise _fail(path, f"unreadable TIFF file ({_reason(err)})") from err
    if data.ndim != len(axes):  # tifffile squeezes; keep axes and data in step
        raise _fail(path, f"unsupported TIFF layout: axes {axes!r} for shape {data.shape}")
    yx, channel, depth = _tiff_layout(axes, data.shape, path)
    if len(axes) == 2 and data.ndim == 2:
        array = data[None]
    else:
        order = ([channel] if channel is not None else []) + ([depth] if depth is not None else []) + yx
        squeezed = [i for i in range(data.ndim) if i not in order]
        array = np.transpose(data, squeezed + order).reshape([data.shape[i] for i in order])
        if channel is None:
            array = array[None]
    return array, _meta(path, "tiff", array, None, 0 if depth is not None else None, tiff_axes=axes)


def _probe_tiff(path: Path) -> tuple[tuple[int, ...], int]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            axes, shape = tif.series[0].axes, tuple(tif.series[0].shape)
    except Exception as err:
        raise _fail(path, f"unreadable TIFF file ({_reason(err)})") from err
    yx, channel, depth = _tiff_layout(axes, shape, path)
    spatial = tuple(shape[i] for i in ([depth] if depth is not None else []) + yx)
    return spatial, shape[channel] if channel is not None else 1


# PNG / JPEG


def _read_pil(path: Path, fmt: str) -> tuple[np.ndarray, dict]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("RGBA", "LA", "PA"):
                img = img.convert("RGB" if mode == "RGBA" else "L")
            elif mode == "CMYK":
                img = img.convert("RGB")
            data = np.asarray(img)  # palette images give their indices: label maps
    except Exception as err:
        raise _fail(path, f"unreadable {fmt.upper()} file ({_reason(err)})") from err
    array = np.moveaxis(data, -1, 0) if data.ndim == 3 else data[None]
    return np.ascontiguousarray(array), _meta(path, fmt, array, None, None, pil_mode=mode)


def _probe_pil(path: Path, fmt: str) -> tuple[tuple[int, ...], int]:
    from PIL import Image

    try:
        with Image.open(path) as img:  # lazy: the header only
            w, h = img.size
            bands = len(img.getbands())
    except Exception as err:
        raise _fail(path, f"unreadable {fmt.upper()} file ({_reason(err)})") from err
    return (h, w), min(bands, 3)


# Dispatch


def _locate(path: str | Path) -> tuple[str, Any]:
    """(format, what its reader takes): the file, or for DICOM the path as given."""
    fmt = detect_format(path)
    if fmt == "dicom":
        return fmt, path
    file = split_series(path)[0]
    if not file.is_file():
        raise _fail(path, "no such file")
    if file.stat().st_size == 0:
        raise _fail(path, "empty file")
    return fmt, file


def read_image(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read ``path`` (a file, a DICOM folder or ``folder::SeriesInstanceUID``); see the module doc."""
    fmt, source = _locate(path)
    readers = {"nifti": _read_nifti, "dicom": _read_dicom, "tiff": _read_tiff}
    return readers[fmt](source) if fmt in readers else _read_pil(source, fmt)


def probe_image(path: str | Path) -> dict:
    """Spatial shape and channel count from the file's header, without reading pixels."""
    fmt, source = _locate(path)
    probes = {"nifti": _probe_nifti, "dicom": _probe_dicom, "tiff": _probe_tiff}
    shape, channels = probes[fmt](source) if fmt in probes else _probe_pil(source, fmt)
    return {"format": fmt, "spatial_shape": tuple(int(s) for s in shape), "channels": int(channels)}


def list_images(folder: str | Path) -> tuple[list[str], list[str]]:
    """Images directly in ``folder`` (files, DICOM series, DICOM sub-folders), and the ignored rest."""
    folder = Path(folder)
    images, ignored = [], []
    loose_dicom = False
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            try:
                series = dicom_series_in(entry)
            except ImageReadError as err:
                series, entry = [], f"{entry} ({err})"
            if series:
                images += series
            else:
                ignored.append(str(entry))
        elif looks_like_dicom(entry):
            loose_dicom = True
        elif is_supported(entry):
            images.append(str(entry))
        else:
            ignored.append(str(entry))
    if loose_dicom:
        try:
            images += dicom_series_in(folder)
        except ImageReadError as err:
            ignored.append(str(err))
    return images, ignored
