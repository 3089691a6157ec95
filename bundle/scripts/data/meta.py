"""Reading image metadata the way it arrives: on a ``MetaTensor``, in a ``<key>_meta_dict``, and
after collation as 0-d or 1-element tensors."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor


def meta_of(d: Mapping, key: Hashable) -> dict:
    value = d[key]
    return value.meta if isinstance(value, MetaTensor) else d.get(f"{key}_meta_dict", {})


def meta_int(value: Any) -> int:
    """Meta values arrive as ints, or as 0-d/1-element tensors after collation."""
    return int(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else int(value)


def meta_pair(value: Any) -> tuple[int, int]:
    return tuple(meta_int(v) for v in value)  # type: ignore[return-value]
