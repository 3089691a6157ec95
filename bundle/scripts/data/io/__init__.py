"""Readers and writers for NIfTI, DICOM, TIFF and PNG/JPEG. Nothing here knows about SAM."""

from .formats import UnsupportedFileError, detect_format, is_supported
from .readers import ImageReadError, list_images, probe_image, read_image
from .writers import write_label

__all__ = [
    "ImageReadError",
    "UnsupportedFileError",
    "detect_format",
    "is_supported",
    "list_images",
    "probe_image",
    "read_image",
    "write_label",
]
