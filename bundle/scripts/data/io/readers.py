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


def _nifti_plane(shape: tuple[int, ...]) -> list[int] | None:
    """The two in-plane axes of a 3D grid one voxel thick along exactly one axis: a 2D image,
    whichever axis is the thin one (``(X, Y, 1)``, ``(X, 1, Z)``, ``(1, Y, Z)``)."""
    plane = [a for a, size in enumerate(shape[:3]) if size != 1]
    return plane if len(shape) >= 3 and len(plane) == 2 else None


def _read_nifti(path: Path) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # applies the scaling; reads everything
    except Exception as err:  # truncated .nii.gz raises EOFError, OSError or zlib errors
        raise _fail(path, f"unreadable NIfTI file ({_reason(err)})") from err
    stored = tuple(int(n) for n in img.shape[:3])
    if data.dtype.names:  # RGB24 / RGBA32: a uint8 record a voxel; its colours as channels, alpha dropped
        data = np.stack([data[name] for name in data.dtype.names[:3]], axis=-1)
        data = data[:, :, None] if data.ndim == 3 else data  # a 2D colour image: (X, Y, 1, 3)
    if data.ndim not in (2, 3, 4):
        raise _fail(path, f"unsupported NIfTI dimensionality {data.shape}: 2D, 3D or 3D + channels expected")
    affine, plane = np.asarray(img.affine, dtype=np.float64), _nifti_plane(data.shape)
    # A 4th axis is channels (MONAI's convention, e.g. multi-sequence MR).
    array = np.moveaxis(data, 3, 0) if data.ndim == 4 else data[None]
    axial = None
    if plane is not None:
        # The thin axis goes; the affine's columns follow the array's axes, the thin one last.
        thin = ({0, 1, 2} - set(plane)).pop()
        array = array.reshape(array.shape[0], *(data.shape[a] for a in plane))
        affine[:, :3] = affine[:, [*plane, thin]]
    elif data.ndim > 2:
        axial = axial_axis_of(affine)
    return array, _meta(path, "nifti", array, affine, axial, nifti_shape=stored)


def _probe_nifti(path: Path) -> tuple[tuple[int, ...], int]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape, colours = tuple(img.shape), img.get_data_dtype().names
    except Exception as err:
        raise _fail(path, f"unreadable NIfTI file ({_reason(err)})") from err
    channels = min(len(colours), 3) if colours else shape[3] if len(shape) == 4 else 1
    plane = _nifti_plane(shape)
    return (tuple(shape[a] for a in plane) if plane else shape[:3]), channels


# DICOM: pydicom reads the headers, groups the files of a folder by SeriesInstanceUID, keeps one
# file per instance and orders and checks the slices; SimpleITK then reads exactly those files.
# A series whose headers do not describe one regular grid is refused, never resampled or guessed.

_SLICE_TOL = 0.05  # how far a slice may lie off its place on the uniform grid, as a fraction of the step
_HEADER_TAGS = [
    "SOPClassUID",
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
    "RescaleSlope",
    "RescaleIntercept",
]
# Objects that are no image to segment, though a folder of images often holds them: segmentations,
# structure sets, reports, key-object selections, presentation states, RT plans, doses and records,
# registrations, waveforms and documents. By Modality, and by SOP class (the class and its sub-classes).
_NON_IMAGE_MODALITIES = frozenset(
    ["SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "KO", "PR", "REG", "FID", "DOC", "PLAN"]
    + ["ECG", "HD", "AU"]  # waveforms
)
_NON_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registrations, fiducials, segmentations (.66.4)
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key-object selection (.88.59)
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF, CDA
)


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
    rescale: tuple[float, float]  # RescaleSlope, RescaleIntercept


class _Series(NamedTuple):
    slices: list[_Slice]  # in reading order, one per instance
    duplicates: list[Path]  # further copies of those instances, left out
    unreadable: list[str]  # problems of the folder's files that belong to no series


def _floats(ds: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    return tuple(float(v) for v in value) if value is not None and len(value) == n else None


def _non_image(ds: Any) -> str | None:
    """What a DICOM object is when it is no image to segment (a SEG, a report ...), else None."""
    modality = str(ds.get("Modality", "")).strip().upper()
    sop = str(ds.get("SOPClassUID", ""))
    if modality in _NON_IMAGE_MODALITIES:
        return f"a DICOM {modality} object"
    if any(sop == uid or sop.startswith(uid + ".") for uid in _NON_IMAGE_SOP_CLASSES):
        return f"a DICOM object of the non-image SOP class {sop}"
    return None


def _header(file: Path) -> _Slice:
    import pydicom

    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
        kind = _non_image(ds)
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
            rescale=(float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)),
        )
    except Exception as err:
        raise _fail(file, f"unreadable DICOM header ({_reason(err)})") from err
    if kind:
        raise _fail(file, f"not an image to segment: {kind}")
    if not all(slice_.size[:2]):  # pydicom stops quietly where a file ends
        raise _fail(file, "unreadable DICOM header (no Rows or Columns: truncated, or not an image)")
    return slice_


def _scan(folder: Path) -> tuple[dict[str, list[_Slice]], list[str]]:
    """The DICOM files directly in ``folder`` by SeriesInstanceUID, and a problem for each file whose
    header does not read or that is no image (a SEG, a report ...): such a file belongs to no series,
    so it spoils none."""
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


def patient_of(path: str | Path) -> str | None:
    """The PatientID of the DICOM image ``path`` names (a file, a folder of one series, or
    ``folder::uid``), from the header of one of its files; None where it has none, is no DICOM or
    does not read (the dataset check names such files)."""
    import pydicom

    folder, uid = split_series(path)
    try:
        files = (
            (f for f in sorted(folder.iterdir()) if not f.name.startswith(".") and looks_like_dicom(f))
            if folder.is_dir()
            else iter([folder] if looks_like_dicom(folder) else [])
        )
        for file in files:
            try:
                ds = pydicom.dcmread(
                    file, stop_before_pixels=True, force=True, specific_tags=["SeriesInstanceUID", "PatientID"]
                )
            except Exception:  # not this series' file, as far as can be told: the next one may be
                continue
            if uid is None or str(ds.get("SeriesInstanceUID", "")) == uid:
                return str(ds.get("PatientID", "") or "").strip() or None
    except OSError:
        return None
    return None


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


def _read_pixels(files: list[str], path: Any, as_float: bool = False) -> Any:
    import SimpleITK as sitk

    try:
        if len(files) == 1:
            return sitk.ReadImage(files[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        if as_float:
            reader.SetOutputPixelType(sitk.sitkFloat32)
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
    # SimpleITK stores the series in the type that the first file's rescaling needs: where the
    # files rescale differently, a later slice's fractional values would be cut to integers.
    as_float = len({s.rescale for s in series.slices}) > 1
    image = _read_pixels([str(s.file) for s in series.slices], path, as_float)
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
    if len(axes) >= 3 and axes[-3] in "IQ" and axes.endswith("YX") and sizes[-1] <= 4 < min(sizes[-3], sizes[-2]):
        # (H, W, C) written as pages of H x C, with no axes recorded: the last axis holds channels.
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


def _tiff_series(tif: Any, path: Any) -> Any:
    """The file's one image: its first series, whose reduced-resolution levels tifffile keeps with it.
    Further series are other images (pages of another size, more scenes): which to read is unknown."""
    if any(not s.keyframe.is_reduced for s in tif.series[1:]):
        raise _fail(
            path,
            f"{len(tif.series)} image series in one TIFF (pages of different sizes or several scenes); "
            "save the image to segment as a file of its own",
        )
    return tif.series[0]


def _alpha_samples(page: Any) -> list[int]:
    """Indices of the samples that ExtraSamples marks as alpha (associated or unassociated)."""
    colour = page.samplesperpixel - len(page.extrasamples)
    return [colour + i for i, kind in enumerate(page.extrasamples) if int(kind) in (1, 2)]


def _palette(page: Any) -> np.ndarray | None:
    """A palette TIFF's colours, indexed by the stored values: (N,) when all are gray, else (N, 3);
    8-bit where the 16-bit colour map holds 8-bit values (multiples of 257)."""
    import tifffile

    if page.photometric != tifffile.PHOTOMETRIC.PALETTE or page.colormap is None:
        return None
    colours = np.asarray(page.colormap, np.uint16)  # (3, N)
    if not (colours % 257).any():
        colours = (colours // 257).astype(np.uint8)
    return colours[0] if (colours == colours[:1]).all() else np.ascontiguousarray(colours.T)


def _inverted(data: np.ndarray, bits: int) -> np.ndarray:
    """MINISWHITE values as intensities: 0 is white."""
    if data.dtype.kind == "f":
        return -data
    if data.dtype.kind == "u":
        return np.asarray((1 << bits) - 1, data.dtype) - data
    return np.invert(data)  # bool, and signed integers: reverses the range exactly


def _tiff_values(
    data: np.ndarray, axes: str, page: Any, colours: np.ndarray | None, as_label: bool
) -> tuple[np.ndarray, str]:
    """Alpha left out; for an image, the palette's ``colours`` and MINISWHITE inverted, as viewers show them."""
    import tifffile

    alpha = _alpha_samples(page)
    if alpha and "S" in axes:
        data = np.delete(data, alpha, axis=axes.index("S"))
    if as_label:
        return data, axes
    if colours is not None:
        data = np.take(colours, data, axis=0)  # also for 1-bit indices, read as bool
        axes = axes + "S" if colours.ndim == 2 else axes
    elif page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        data = _inverted(data, page.bitspersample)
    return data, axes


def _read_tiff(path: Path, as_label: bool = False) -> tuple[np.ndarray, dict]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = _tiff_series(tif, path)
            axes, data, page = series.axes, series.asarray(), series.keyframe
            colours = None if as_label else _palette(page)
    except ImageReadError:
        raise
    except Exception as err:
        raise _fail(path, f"unreadable TIFF file ({_reason(err)})") from err
    if data.ndim != len(axes):  # tifffile squeezes; keep axes and data in step
        raise _fail(path, f"unsupported TIFF layout: axes {axes!r} for shape {data.shape}")
    data, axes = _tiff_values(data, axes, page, colours, as_label)
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
            series = _tiff_series(tif, path)
            axes, shape, page = series.axes, tuple(series.shape), series.keyframe
            colours = _palette(page)
    except ImageReadError:
        raise
    except Exception as err:
        raise _fail(path, f"unreadable TIFF file ({_reason(err)})") from err
    yx, channel, depth = _tiff_layout(axes, shape, path)
    spatial = tuple(shape[i] for i in ([depth] if depth is not None else []) + yx)
    channels = shape[channel] if channel is not None else 1
    if channel is not None and axes[channel] == "S":
        channels -= len(_alpha_samples(page))
    return spatial, 3 if colours is not None and colours.ndim == 2 else channels


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


_EXIF_ORIENTATION = 0x0112


def _orientation(img: Any, header_only: bool = False) -> int:
    """The EXIF Orientation (1..8; 1 where there is none or it is invalid). Pillow decodes a PNG
    to look for an eXIf chunk after its pixels: ``header_only`` looks only before them."""
    if header_only and img.format == "PNG" and "exif" not in img.info:
        return 1
    value = img.getexif().get(_EXIF_ORIENTATION, 1)
    return value if value in range(1, 9) else 1


def _upright(data: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W[, C]) pixels as viewers show them: EXIF orientations 5..8 transpose the stored
    rows and columns, and each orientation flips rows and/or columns as ImageOps.exif_transpose does."""
    if orientation >= 5:
        data = data.swapaxes(0, 1)
    flip = (orientation - 1) % 4  # 0: none, 1: columns, 2: both, 3: rows
    if flip in (2, 3):
        data = data[::-1]
    if flip in (1, 2):
        data = data[:, ::-1]
    return data


def _deep_png(path: Path) -> int:
    """The colour type of a PNG of 16 bits per sample in colour or with alpha, which Pillow reads
    cut to 8 bits (2: RGB, 4: gray + alpha, 6: RGBA); 0 for any other file."""
    with open(path, "rb") as f:
        head = f.read(26)
    deep = len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 4, 6)
    return head[25] if deep else 0


def _check_deep_png(path: Path) -> int:
    colour_type = _deep_png(path)
    if colour_type == 4:  # SimpleITK reads 16-bit RGB(A) PNG, not gray + alpha
        raise _fail(path, "16-bit gray + alpha PNG, not readable at its full depth; save it without alpha, or as TIFF")
    return colour_type


def _read_png16(path: Path) -> np.ndarray:
    """(H, W, 3) uint16 from a 16-bit RGB or RGBA PNG, its alpha left out."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path), imageIO="PNGImageIO"))[..., :3]


def _pil_pixels(img: Any, as_label: bool) -> np.ndarray:
    """Intensities with any alpha left out; a label keeps its palette's indices (VOC-style
    label PNGs number their classes so), an image has its palette's colours, gray when all are gray."""
    if img.mode in ("P", "PA"):
        if as_label:
            return np.asarray(img.getchannel(0))
        rgb = np.asarray(img.convert("RGB"))
        return rgb[..., 0] if (rgb == rgb[..., :1]).all() else rgb
    if img.mode in ("RGBA", "CMYK"):
        img = img.convert("RGB")
    elif img.mode == "LA":
        img = img.convert("L")
    return np.asarray(img)


def _read_pil(path: Path, fmt: str, as_label: bool = False) -> tuple[np.ndarray, dict]:
    try:
        deep = fmt == "png" and _check_deep_png(path)
        with _open_pil(path) as img:
            mode, orientation = img.mode, _orientation(img)
            data = _read_png16(path) if deep else _pil_pixels(img, as_label)
    except ImageReadError:
        raise
    except Exception as err:
        raise _fail(path, f"unreadable {fmt.upper()} file ({_reason(err)})") from err
    data = _upright(data, orientation)  # labels drawn on the image as shown match it
    array = np.moveaxis(data, -1, 0) if data.ndim == 3 else data[None]
    return np.ascontiguousarray(array), _meta(path, fmt, array, None, None, pil_mode=mode)


def _probe_pil(path: Path, fmt: str) -> tuple[tuple[int, ...], int]:
    try:
        deep = fmt == "png" and _check_deep_png(path)
        with _open_pil(path) as img:  # lazy: the header only
            w, h = img.size
            bands = img.getbands()
            orientation = _orientation(img, header_only=True)
    except ImageReadError:
        raise
    except Exception as err:
        raise _fail(path, f"unreadable {fmt.upper()} file ({_reason(err)})") from err
    # alpha is left out; a palette may hold colours
    channels = 1 if len(bands) <= 2 and bands[0] != "P" and not deep else 3
    return ((w, h) if orientation >= 5 else (h, w)), channels


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


def read_image(path: str | Path, as_label: bool = False) -> tuple[np.ndarray, dict]:
    """Read ``path`` (a file, a DICOM folder or ``folder::SeriesInstanceUID``); see the module doc.
    ``as_label``: the file holds a label map, so its stored values are kept (a palette's indices, a
    TIFF's MINISWHITE values) where an image's are turned into the intensities a viewer shows."""
    fmt, source = _locate(path)
    if fmt == "tiff":
        return _read_tiff(source, as_label)
    readers = {"nifti": _read_nifti, "dicom": _read_dicom}
    return readers[fmt](source) if fmt in readers else _read_pil(source, fmt, as_label)


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
