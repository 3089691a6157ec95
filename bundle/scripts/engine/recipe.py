"""The recipe: every knob that changes what the network sees or what the labels mean.

Training records it in ``model.pt`` (``ptsam_recipe``) beside the prompts. Evaluation,
inference, export and the MONAI Label app take it from there: their recipe knobs default to
null ("as trained"); a value given explicitly must agree with the recorded one, or the run
stops before any work with a message naming both. A ``model.pt`` written before recipes were
recorded loads with ``LEGACY``, the defaults of that time, and a note saying so. A knob added
since (``ADDED``) is read, where a recorded recipe lacks it, as what the files of before saw.

Besides the knobs, training records ``image_kind``, the kind of images that trained or chose
the prompts ("2d", "volume" or "mixed", found from the images: ``scripts.data.kinds``); it is no
knob to set or compare, and evaluation and inference refuse images of another kind unless
``allow_other_kind``. A recipe recorded before it was lacks it: the kind is then unknown, and
no image is refused for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.kinds import check_kind, kind_of_images
from ..model.prompt_file import read_recipe

logger = logging.getLogger(__name__)

KNOBS = (
    "intensity",  # auto | window | percentile | none
    "a_min",  # CT window, HU
    "a_max",
    "channels",  # which channels of a multi-channel image, or null
    "slice_axis",  # volumes: the axis cut into slices, or null (each file's axial axis)
    "scale",  # resize | native
    "sw_overlap",  # native scale: sliding-window overlap and blending
    "sw_blend",
    "classes",  # label values of classes 1..C
    "label_map",  # label values rewritten first
    "class_names",
    "image_size",  # the network's input size (follows sam_variant)
    "layout",  # display (NIfTI/DICOM in-plane axes swapped to rows = y) | stored (arrays as read)
)

# The defaults of the bundle before model.pt carried a recipe (what such files were trained with).
LEGACY: dict[str, Any] = {
    "intensity": "auto",
    "a_min": -160.0,
    "a_max": 240.0,
    "channels": None,
    "slice_axis": None,
    "scale": "resize",
    "sw_overlap": 0.25,
    "sw_blend": "gaussian",
    "classes": [1],
    "label_map": {},
    "class_names": ["foreground"],
}

# Knobs recorded since recipes were, with what the model.pt files written before them saw.
ADDED: dict[str, Any] = {"layout": "stored"}


class RecipeMismatchError(ValueError):
    """A knob given explicitly that contradicts the recipe recorded in model.pt."""


def _int_list(value: Any) -> list[int] | None:
    return None if value is None else [int(v) for v in value]


_NORMAL = {
    "intensity": str,
    "a_min": float,
    "a_max": float,
    "channels": _int_list,
    "slice_axis": lambda v: None if v is None else int(v),
    "scale": str,
    "sw_overlap": float,
    "sw_blend": str,
    "classes": _int_list,
    "label_map": lambda v: {int(k): int(x) for k, x in (v or {}).items()},  # JSON keys are strings
    "class_names": lambda v: [str(n) for n in v],
    "image_size": int,
    "layout": str,
}


IMAGE_KIND = "image_kind"  # recorded with the knobs, not one of them: see the module doc


def normalize(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with every value in one canonical form (YAML's -100 and JSON's -100.0 agree),
    and its ``image_kind`` where it records one."""
    missing = [k for k in KNOBS if k not in recipe]
    if missing:
        raise ValueError(f"a recipe needs {', '.join(missing)}")
    normal = {k: _NORMAL[k](recipe[k]) for k in KNOBS}
    return normal if IMAGE_KIND not in recipe else {**normal, IMAGE_KIND: recipe[IMAGE_KIND]}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def differing_knobs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The knobs on which two normalised recipes (``normalize``) disagree. Unnormalised ones could
    only differ more (-100 and -100.0 agree; {"255": 1} and {255: 1} do not), never agree wrongly."""
    return [k for k in KNOBS if not _same(a[k], b[k])]


def describe_clashes(a: Mapping[str, Any], b: Mapping[str, Any], a_says: str, b_says: str) -> str:
    """Each knob on which two normalised recipes disagree, with both values, ``"; "``-joined
    ("intensity: model.pt has 'window', given 'percentile'"); empty if they agree."""
    return "; ".join(f"{k}: {a_says} {a[k]!r}, {b_says} {b[k]!r}" for k in differing_knobs(a, b))


def recorded_recipe(model_path: str | Path) -> dict[str, Any] | None:
    """The recipe ``model_path`` records, with the knobs added since it was written (``ADDED``);
    None if it records none."""
    recorded = read_recipe(model_path)
    return None if recorded is None else {**ADDED, **recorded}


def as_trained(model_path: str | Path, image_size: int, **given: Any) -> dict[str, Any]:
    """The recipe ``model_path`` was trained with, checked against the knobs given explicitly
    (non-null ``given`` values). Without a ``model_path`` yet, the given knobs over ``LEGACY``
    (the run then stops at its prompt loader with a message saying how to train)."""
    unknown = set(given) - set(KNOBS)
    if unknown:
        raise TypeError(f"not recipe knobs: {sorted(unknown)}")
    explicit = {k: v for k, v in given.items() if v is not None}
    path = Path(model_path)
    recorded = recorded_recipe(path) if path.is_file() else None
    if recorded is None:
        if path.is_file():
            logger.warning(
                "%s records no preprocessing recipe (written by an older bundle): assuming that "
                "version's defaults %s, with the knobs given here",
                path,
                {**LEGACY, **ADDED},
            )
        return normalize({**LEGACY, **ADDED, "image_size": image_size, **explicit})
    recorded = normalize(recorded)
    mine = normalize({**recorded, **explicit, "image_size": image_size})
    differ = describe_clashes(recorded, mine, "model.pt has", "given")
    if differ:
        raise RecipeMismatchError(
            f"{path} was trained with another recipe than this run asks for ({differ}). "
            "Leave these knobs unset to use the recorded values, or train again with the new ones."
        )
    if check_kind(recorded.get(IMAGE_KIND), f"{path}") is None:
        logger.info(
            "%s does not record the kind of images (2D, volumes) its prompts were trained on (an older "
            "bundle wrote it): inputs are not checked for their kind",
            path,
        )
    return recorded


def from_knobs(**knobs: Any) -> dict[str, Any]:
    """A training's recipe, from its knobs (what ``model.pt`` will record, with ``with_image_kind``)."""
    return normalize(knobs)


def with_image_kind(recipe: Mapping[str, Any], items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What ``model.pt`` records: ``recipe`` and the kind of the images of ``items`` (a training's
    training and validation cases, which trained and chose the prompts); None for no images."""
    return {**recipe, IMAGE_KIND: kind_of_images(item["image"] for item in items)}
