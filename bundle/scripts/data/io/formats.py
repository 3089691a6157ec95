"""Which format a path holds, and which files of a folder are images."""

from __future__ import annotations

from pathlib import Path

SERIES_SEP = "::"  # "<folder>::<SeriesInstanceUID>" names one DICOM series of a folder

# Readers give 2D NIfTI and DICOM arrays as (x, y), columns first, as their voxel grids are
# indexed, and these formats carry a real affine; PNG, JPEG and TIFF arrays are (rows, columns).
COLUMNS_FIRST = frozenset({"nifti", "dicom"})

_SUFFIXES = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".dcm": "dicom",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
}


class UnsupportedFileError(ValueError):
    """A path that is no image format this bundle reads."""


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def looks_like_dicom(path: Path) -> bool:
    """A ``.dcm`` file, or one with no image suffix that starts like DICOM (exports often name files
    by UID, ``1.2.840....7``, or ``IM0001.IMA``)."""
    suffix = suffix_of(path)
    return path.is_file() and (suffix == ".dcm" or (suffix not in _SUFFIXES and _is_dicom_file(path)))


def split_series(path: str | Path) -> tuple[Path, str | None]:
    """``"dir::uid"`` -> (dir, uid); any other path -> (path, None)."""
    text = str(path)
    if SERIES_SEP in text:
        folder, uid = text.rsplit(SERIES_SEP, 1)
        return Path(folder), uid
    return Path(text), None


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | Path) -> str:
    """File name without its image suffix (``case.nii.gz`` -> ``case``)."""
    name = Path(path).name
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def case_name(path: str | Path) -> str:
    """The name of the case ``path`` holds, whatever its format: a file's name less its image suffix
    (``ct_006.nii.gz``, ``ct_006.png`` -> ``ct_006``), a DICOM series' folder name (``ct_006/``,
    ``ct_006::<uid>`` -> ``ct_006``). Only an image suffix goes: a DICOM file named by its UID
    (``1.2.840.5``) keeps its whole name."""
    name = split_series(path)[0].name
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix in _SUFFIXES else name


def output_stem(path: str | Path) -> str:
    """The name that files made from an input start with: the file's stem, or for a DICOM series
    ``folder::uid`` the folder's name and the UID's end (one folder may hold several series)."""
    folder, uid = split_series(path)
    return stem_of(folder) if uid is None else f"{folder.name}_{uid[-12:]}"


def detect_format(path: str | Path) -> str:
    """'nifti', 'dicom', 'tiff', 'png' or 'jpeg'; a folder (or ``folder::uid``) is a DICOM series."""
    if not str(path).strip():  # Path("") would be the working directory
        raise UnsupportedFileError("no image path given (an empty path)")
    folder, uid = split_series(path)
    if uid is not None or folder.is_dir():
        return "dicom"
    kind = _SUFFIXES.get(suffix_of(folder))
    if kind is None and _is_dicom_file(folder):
        kind = "dicom"
    if kind is None:
        raise UnsupportedFileError(
            f"{path}: not a supported image file (NIfTI .nii/.nii.gz, DICOM, TIFF, PNG or JPEG expected)"
        )
    return kind


def is_supported(path: str | Path) -> bool:
    try:
        detect_format(path)
    except UnsupportedFileError:
        return False
    return True
