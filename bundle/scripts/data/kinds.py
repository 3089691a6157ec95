"""What kind of image a file is: one 2D image, or a 3D volume that is segmented slice by slice.

Prompts learn from images as a recipe prepares them, and a recipe fitted to one kind says little
about the other: percentiles of 8-bit display images or microscopy fields are not a window on
Hounsfield units, and a CT window does nothing sensible to a photograph. Training records the
kind of its images in model.pt (``image_kind`` in the recipe: "2d", "volume", or "mixed" when it
learned from both); evaluation and inference refuse a file of another kind, naming it and both
kinds, unless ``allow_other_kind`` is set.

A file's kind is its dimensionality as the readers give it (``probe_image``, ``read_image``): a
NIfTI or TIFF one voxel thick and a single DICOM slice are 2D images; a NIfTI volume, a DICOM
series and a TIFF Z stack are volumes (what training slices, ``SampleSlicesd``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .io import probe_image

KINDS = ("2d", "volume", "mixed")
_SAID = {"2d": "a 2D image", "volume": "a 3D volume"}
_TRAINED_ON = {"2d": "2D images", "volume": "3D volumes", "mixed": "2D images and 3D volumes"}


def kind_of_shape(spatial_shape: Sequence[int]) -> str:
    """'volume' for three spatial axes (a stack of slices), '2d' for two."""
    return "volume" if len(spatial_shape) == 3 else "2d"


def image_kind(path: Any) -> str:
    """The kind of the image ``path`` names, from its header."""
    return kind_of_shape(probe_image(path)["spatial_shape"])


def kind_of_images(paths: Iterable[Any]) -> str | None:
    """The kind of a set of images: '2d', 'volume', 'mixed' where both occur, None for none."""
    found = {image_kind(p) for p in paths}
    return None if not found else found.pop() if len(found) == 1 else "mixed"


def check_kind(kind: Any, source: str) -> str | None:
    """A recorded ``image_kind`` (None: not recorded); an unknown value is refused, naming ``source``."""
    if kind is None or kind in KINDS:
        return kind
    raise ValueError(f"{source}: image_kind {kind!r} is none of {', '.join(KINDS)}")


def kind_mismatch(image: Any, kind: str, trained: str | None) -> str | None:
    """That ``image``, of ``kind``, is not of the kind the prompts were ``trained`` on (None if it
    is, or if they learned from both kinds, or if the kind they learned from is not recorded)."""
    if trained in (None, "mixed") or kind == trained:
        return None
    trained_on = f"{_TRAINED_ON[trained]} (image_kind {trained!r})"
    return f"{image}: {_SAID[kind]}, but the prompts of model.pt were trained on {trained_on}"


def kind_problem(image: Any, kind: str, trained: str | None) -> str | None:
    """``kind_mismatch`` with why it is refused and what to do (None if nothing is wrong)."""
    mismatch = kind_mismatch(image, kind, trained)
    return mismatch and (
        f"{mismatch}: their recipe (intensity mapping, slicing) was fitted to that kind, and its masks "
        "here would mean nothing. Use prompts trained on this kind of image, or set allow_other_kind true "
        "if the two are prepared alike (e.g. CT slices exported as PNG with the training's intensities)"
    )


class ImageKindError(ValueError):
    """An image of another kind than the prompts were trained on."""
