"""Label values and classes: which file values are which class (0 is background, ``classes``
lists the values of classes 1..C, ``label_map`` rewrites values first), and per-class masks.
The dataset check, the label transforms and the metrics all follow this one policy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class LabelValueError(ValueError):
    """A label holding values that are not among the declared classes."""


def class_of_values(
    values: Sequence[float], classes: Sequence[int], label_map: Mapping[int, int] | None = None
) -> tuple[dict[float, int], list[float]]:
    """Class index (0 = background, 1..C) of each label value, and the values that fit no class.

    ``classes``: the label values of classes 1..C (e.g. ``[1]`` or ``[128, 255]``);
    ``label_map``: values replaced first (e.g. ``{255: 1}``).
    """
    lookup = {0: 0, **{int(c): i + 1 for i, c in enumerate(classes)}}
    mapping = {int(k): int(v) for k, v in (label_map or {}).items()}
    found, bad = {}, []
    for value in values:
        target = mapping.get(int(value), int(value)) if value == int(value) else None
        if target in lookup:
            found[value] = lookup[target]
        else:
            bad.append(value)
    return found, bad


def describe_bad_labels(bad: Sequence[float], classes: Sequence[int]) -> str:
    shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
    return (
        f"label values {shown} are not among the declared classes {list(classes)} (0 is background); "
        "declare them in `classes` or map them with `label_map`, for example {255: 1}"
    )


def class_masks(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class numbers (1, ...) -> one binary mask per class (num_classes, ...), background dropped."""
    return torch.cat([(label == c).float() for c in range(1, num_classes + 1)])
