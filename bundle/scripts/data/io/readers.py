"""Read any supported image into one form: a channel-first array and its metadata.

``read_image(path)`` returns ``(array, meta)``: ``array`` is ``(C, H, W)`` for 2D images and
``(C, d0, d1, d2)`` for volumes, in the file's own data type; ``meta`` holds the file name,
format, spatial shape, a 4 x 4 RAS ``affine`` (identity for formats without geometry) and
``axial_axis``: the spatial axis along which a volume is cut into 2D slices by default.
``probe_image(path)`` reads headers only, so budgets are checked before any pixel is read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .formats import SERIES_SEP, detect_format, is_supported, looks_like_dicom, split_series

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

logger = logging.getLogger(__name__)


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
    if data.dtype.names:
        array, axial = _colour_nifti(data, img.affine, path)
    elif data.ndim == 2:
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


def _colour_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> tuple[np.ndarray, int | None]:
    """RGB24 / RGBA32 voxels (one uint8 record each): the colours as channels, alpha dropped as for PNG."""
    array = np.stack([data[name] for name in data.dtype.names[:3]])
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 3:
        return array, None
    if array.ndim == 4:
        return array, axial_axis_of(affine)
    raise _fail(path, f"unsupported NIfTI dimensionality {data.shape} of colour voxels: 2D or 3D expected")


def _probe_nifti(path: Path) -> tuple[tuple[int, ...], int]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape, colours = tuple(img.shape), img.get_data_dtype().names
    except Exception as err:
        raise _fail(path, f"unreadable NIfTI file ({_reason(err)})") from err
    channels = min(len(colours), 3) if colours else shape[3] if len(shape) == 4 else 1
    return tuple(s for s in shape[:3] if s != 1) or shape[:2], channels


# DICOM: pydicom reads the headers, groups the files of a folder by SeriesInstanceUID, keeps one
# file per instance and orders and checks the slices; SimpleITK then reads exactly those files.
# A series whose headers do not describe one regular grid is refused, never resampled or guessed.

_SLICE_TOL = 0.05  # how far a slice may lie off its place on the uniform grid, as a fraction of the step
_HEADER_TAGS = [
    "Modality",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SamplesPerPixel",
    "Rows",
    "Columns",
    "NumberOfFrames",
]


class _Slice(NamedTuple):
    """What a DICOM file's header says about where its pixels belong."""

    file: Path
    series: str  # SeriesInstanceUID
    instance: str  # SOPInstanceUID (the file's path where it has none)
    number: int  # InstanceNumber
    size: tuple[int, int, int, int]  # columns, rows, frames, samples per pixel
    position: tuple[float, ...] | None  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row, then column direction
    modality: str
    nbytes: int


class _Series(NamedTuple):
    slices: list[_Slice]  # in reading order, one per instance
    duplicates: list[Path]  # further copies of those instances, left out
    unreadable: list[str]  # problems of the folder's files that belong to no series


def _floats(ds: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    return tuple(float(v) for v in value) if value is not None and len(value) == n else None


def _header(file: Path) -> _Slice:
    import pydicom

    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
        slice_ = _Slice(
            file=file,
            series=str(ds.get("SeriesInstanceUID", "")),
            instance=str(ds.get("SOPInstanceUID", "")) or str(file),
            number=int(ds.get("InstanceNumber") or 0),
            size=(
                int(ds.get("Columns") or 0),
                int(ds.get("Rows") or 0),
                int(ds.get("NumberOfFrames") or 1),
                int(ds.get("SamplesPerPixel") or 1),
            ),
            position=_floats(ds, "ImagePositionPatient", 3),
            orientation=_floats(ds, "ImageOrientationPatient", 6),
            modality=str(ds.get("Modality", "")).strip(),
            nbytes=file.stat().st_size,
        )
    except Exception as err:
        raise _fail(file, f"unreadable DICOM header ({_reason(err)})") from err
    if not all(slice_.size[:2]):  # pydicom stops quietly where a file ends
        raise _fail(file, "unreadable DICOM header (no Rows or Columns: truncated, or not an image)")
    return slice_


def _scan(folder: Path) -> tuple[dict[str, list[_Slice]], list[str]]:
    """The DICOM files directly in ``folder`` by SeriesInstanceUID, and a problem for each file whose
    header does not read: such a file belongs to no series, so it spoils none."""
    try:
        files = sorted(f for f in folder.iterdir() if not f.name.startswith(".") and looks_like_dicom(f))
    except OSError as err:
        raise _fail(folder, f"cannot list the files of this folder ({_reason(err)})") from err
    series: dict[str, list[_Slice]] = {}
    unreadable = []
    for file in files:
        try:
            slice_ = _header(file)
        except ImageReadError as err:
            unreadable.append(str(err))
            continue
        if slice_.series:
            series.setdefault(slice_.series, []).append(slice_)
        else:
            unreadable.append(f"{file}: unreadable DICOM header (no SeriesInstanceUID)")
    return series, unreadable


def _dicom_in(folder: Path) -> tuple[list[str], list[str]]:
    """``folder::uid`` for every series of ``folder``, and a problem for each file that is in none."""
    found, unreadable = _scan(folder)
    return [f"{folder}{SERIES_SEP}{uid}" for uid in sorted(found)], unreadable


def dicom_series_in(folder: Path) -> list[str]:
    """``folder::uid`` for every DICOM series directly in ``folder`` (grouped by SeriesInstanceUID)."""
    return _dicom_in(folder)[0]


def _names(files: Sequence[Path], limit: int = 4) -> str:
    return ", ".join(f.name for f in files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _series(path: Any) -> _Series:
    """The slices that ``path`` (a file, a folder of one series, or ``folder::uid``) names."""
    folder, uid = split_series(path)
    if folder.is_file():
        return _Series([_header(folder)], [], [])
    if not folder.exists():
        raise _fail(path, "no such file or folder")
    found, unreadable = _scan(folder)
    if uid is None:
        if not found:
            why = f" ({unreadable[0]}{' ...' if len(unreadable) > 1 else ''})" if unreadable else ""
            raise _fail(path, f"no readable DICOM series in this folder{why}")
        if len(found) > 1:
            name = f"{folder}{SERIES_SEP}<SeriesInstanceUID>"
            raise _fail(path, f"{len(found)} series in this folder; name one as '{name}'")
        uid = next(iter(found))
    if uid not in found:
        raise _fail(path, f"no DICOM series {uid} in {folder}")
    slices, duplicates = _one_per_instance(found[uid], path)
    return _Series(_ordered(slices, path), duplicates, unreadable)


def series_files(path: Any) -> list[str]:
    """The files of the DICOM series ``path`` names, in the order the reader stacks them."""
    return [str(s.file) for s in _series(path).slices]


def _one_per_instance(slices: list[_Slice], path: Any) -> tuple[list[_Slice], list[Path]]:
    """Copies of an instance (one SOPInstanceUID) are read once: from the largest file, so that a
    truncated copy is never preferred to a whole one, then the shortest name ('A.dcm', not 'A (copy).dcm')."""
    copies: dict[str, list[_Slice]] = {}
    for s in slices:
        copies.setdefault(s.instance, []).append(s)
    kept, duplicates = [], []
    for group in copies.values():
        group.sort(key=lambda s: (-s.nbytes, len(s.file.name), s.file.name))
        first = group[0]
        if any(s.position != first.position or s.size[:2] != first.size[:2] for s in group):
            raise _fail(path, f"files with one SOPInstanceUID but different headers: {_names([s.file for s in group])}")
        kept.append(first)
        duplicates += [s.file for s in group[1:]]
    return kept, duplicates


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def _ordered(slices: list[_Slice], path: Any) -> list[_Slice]:
    """The slices along their normal, refused unless they are one stack of equal planes."""
    if len(slices) == 1:
        return slices
    first = slices[0]
    if any(s.size[2] > 1 for s in slices):
        raise _fail(path, f"{len(slices)} multi-frame files in one series; read each file on its own ({first.file})")
    if any(s.size != first.size for s in slices):
        raise _fail(path, f"slices of different sizes or channels: {_names([s.file for s in slices])}")
    placed = [s for s in slices if s.position is not None and s.orientation is not None]
    if not placed:  # no geometry to keep: the acquisition order
        return sorted(slices, key=lambda s: (s.number, s.file.name))
    if len(placed) < len(slices):
        unplaced = [s.file for s in slices if s not in placed]
        raise _fail(path, f"no ImagePositionPatient or ImageOrientationPatient in {_names(unplaced)}")
    if any(not np.allclose(s.orientation, first.orientation, atol=1e-4) for s in slices):
        raise _fail(path, f"slices of different orientations (a localizer?): {_names([s.file for s in slices])}")
    normal = _normal(first.orientation)
    slices = sorted(slices, key=lambda s: (float(np.dot(s.position, normal)), s.file.name))
    _check_stack(slices, normal, path)
    return slices


def _check_stack(slices: list[_Slice], normal: np.ndarray, path: Any) -> None:
    """Refuse positions that are no uniform grid along the normal: SimpleITK would stack them at
    one mean spacing, so the volume's geometry would not be the headers'."""
    points = np.array([s.position for s in slices])
    depth = (points - points[0]) @ normal
    gaps = np.diff(depth)
    same = np.flatnonzero(gaps < max(_SLICE_TOL * float(np.median(gaps)), 1e-3))
    if same.size:
        files = list(dict.fromkeys(slices[j].file for i in same for j in (i, i + 1)))
        raise _fail(path, f"different instances at the same position (multi-echo or multi-phase?): {_names(files)}")
    step = depth[-1] / (len(slices) - 1)
    if np.abs(depth - step * np.arange(len(slices))).max() > _SLICE_TOL * step:
        i = int(np.argmax(np.abs(gaps - step)))
        raise _fail(
            path,
            f"slice spacing is not uniform: {gaps[i]:.3g} mm between {slices[i].file.name} and "
            f"{slices[i + 1].file.name}, {step:.3g} mm on average (missing or extra slices?)",
        )
    shift = np.linalg.norm(points - points[0] - np.outer(depth, normal), axis=1).max()
    if shift > _SLICE_TOL * step:
        raise _fail(path, f"slices shift by up to {shift:.3g} mm within their plane (a tilted gantry?)")


def _sitk_affine(image: Any) -> np.ndarray:
    """RAS affine of a SimpleITK image, for the array transposed to (x, y, z) index order."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())[None, :]
    affine[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ affine


def _pixels_read(file: str) -> bool:
    import SimpleITK as sitk

    try:
        sitk.ReadImage(file)
    except RuntimeError:
        return False
    return True


def _read_pixels(files: list[str], path: Any) -> Any:
    import SimpleITK as sitk

    try:
        if len(files) == 1:
            return sitk.ReadImage(files[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        return reader.Execute()
    except RuntimeError as err:  # truncated or undecodable pixel data; SimpleITK does not say where
        bad = [Path(f) for f in files if not _pixels_read(f)] if len(files) > 1 else [Path(files[0])]
        where = f" in {_names(bad)}" if bad else ""
        raise _fail(path, f"unreadable DICOM pixel data{where} ({_reason(err)})") from err


def _check_geometry(image: Any, slices: list[_Slice], path: Any) -> None:
    """The stacked volume must sit where the headers put its slices."""
    if len(slices) < 2 or slices[0].position is None:
        return
    first, last = np.array(slices[0].position), np.array(slices[-1].position)
    normal = _normal(slices[0].orientation)
    step = float((last - first) @ normal) / (len(slices) - 1)
    axis = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    tol = _SLICE_TOL * step
    if not (
        image.GetSize()[2] == len(slices)
        and np.allclose(image.GetOrigin(), first, atol=tol)
        and abs(image.GetSpacing()[2] - step) <= tol
        and np.allclose(axis, normal, atol=1e-3)
    ):
        raise _fail(path, f"the stacked volume does not match the slices' positions ({slices[0].file.name} ...)")


def _read_dicom(path: Any) -> tuple[np.ndarray, dict]:
    import SimpleITK as sitk

    series = _series(path)
    if series.duplicates:
        logger.warning("%s: read each instance once; left out duplicates %s", path, _names(series.duplicates))
    for problem in series.unreadable:
        logger.warning("%s: left out a file of its folder: %s", path, problem)
    image = _read_pixels([str(s.file) for s in series.slices], path)
    _check_geometry(image, series.slices, path)
    data = sitk.GetArrayFromImage(image)  # z, y, x (and components last)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
        data = data[None]
    if image.GetNumberOfComponentsPerPixel() > 1:  # colour DICOM: z, y, x, c
        data = np.moveaxis(data, -1, 0)
    else:
        data = data[None]
    array = np.ascontiguousarray(np.transpose(data, (0, 3, 2, 1)))  # C, x, y, z
    affine = _sitk_affine(image)
    if array.shape[3] == 1:
        array, axial = array[..., 0], None
    else:
        axial = axial_axis_of(affine)
    extra = {"modality": series.slices[0].modality, "n_files": len(series.slices)}
    return array, _meta(path, "dicom", array, affine, axial, **extra, duplicates=[f.name for f in series.duplicates])


def _probe_dicom(path: Any) -> tuple[tuple[int, ...], int]:
    slices = _series(path).slices
    columns, rows, frames, samples = slices[0].size
    depth = len(slices) if len(slices) > 1 else frames
    return (columns, rows) + ((depth,) if depth > 1 else ()), samples


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


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _without_pillow_limit() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit for one open: the ``max_voxels`` budget, checked on the
    probed shape before any pixel is read, governs every format. The limit is only checked while
    opening and is restored at once, so the rest of the process keeps it."""
    from PIL import Image

    with _PILLOW_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _open_pil(path: Path) -> Any:
    from PIL import Image

    with _without_pillow_limit():
        return Image.open(path)


def _read_pil(path: Path, fmt: str) -> tuple[np.ndarray, dict]:
    try:
        with _open_pil(path) as img:
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
    try:
        with _open_pil(path) as img:  # lazy: the header only
            w, h = img.size
            bands = len(img.getbands())
    except Exception as err:
        raise _fail(path, f"unreadable {fmt.upper()} file ({_reason(err)})") from err
    return (h, w), min(bands, 3)


# Dispatch


def _locate(path: str | Path) -> tuple[str, Any]:
    """(format, what its reader takes): the file, or for DICOM the path as given."""
    file, uid = split_series(path)
    if uid is None and str(path).strip() and not file.exists():  # before its name is judged
        raise _fail(path, "no such file")
    fmt = detect_format(path)
    if fmt == "dicom":
        return fmt, path
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
    """Images directly in ``folder`` (files, DICOM series, DICOM sub-folders), and the ignored rest
    (an unreadable DICOM file as '<file>: <problem>')."""
    folder = Path(folder)
    images, ignored = [], []
    loose_dicom = False
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            try:
                series, unreadable = _dicom_in(entry)
            except ImageReadError as err:
                series, unreadable = [], [str(err)]
            images += series
            ignored += unreadable
            if not series and not unreadable:  # no DICOM in it
                ignored.append(str(entry))
        elif looks_like_dicom(entry):
            loose_dicom = True
        elif is_supported(entry):
            images.append(str(entry))
        else:
            ignored.append(str(entry))
    if loose_dicom:
        try:
            series, unreadable = _dicom_in(folder)
        except ImageReadError as err:
            series, unreadable = [], [str(err)]
        images += series
        ignored += unreadable
    return images, ignored
