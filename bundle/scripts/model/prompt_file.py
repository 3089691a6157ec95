"""Prompt-only checkpoints: what PTSAM learned, and what it was learned on.

``PTSAM.state_dict()`` holds the prompt tokens and a ``ptsam_meta`` entry (variant, prompt
counts, classes, backbone fingerprint); the frozen SAM weights come from ``sam_checkpoint``
and are never part of it. ``save_prompts`` adds the training's preprocessing recipe as
``ptsam_recipe`` (JSON, see ``scripts.engine.recipe``), so that evaluation and inference see
images as the prompts were trained on them, and its split as ``ptsam_split`` (which images
trained the prompts and which chose them, see ``scripts.engine.splits``), so that evaluation
never scores those as held-out test images. Loading through ``load_state_dict``, strict or not (MONAI's
``CheckpointLoader``, MONAI Label), compares ``ptsam_meta`` with the network first and
refuses a file made for another network, so no prompt is silently dropped.

``ptsam_meta`` is JSON in a fixed-length uint8 tensor rather than a dict: MONAI tools that
treat every state-dict entry as a tensor (``copy_model_state`` in ``ckpt_export`` and in
``CheckpointLoader(strict_shape=False)``) then carry it like any weight, and the check still runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..common.files import atomic_torch_save

META_KEY = "ptsam_meta"
RECIPE_KEY = "ptsam_recipe"
SPLIT_KEY = "ptsam_split"
META_BYTES = 512
FORMAT_VERSION = 1
BACKBONE = "backbone"
_BACKBONE_KEY = re.compile(rf"(^|\.){BACKBONE}\.")
_COMPARED = ("sam_variant", "n_md_prompts", "n_ie_prompts", "num_classes", "backbone_fingerprint")


class IncompatibleCheckpointError(ValueError):
    """A prompt checkpoint made for another backbone, prompt count or class count."""


def network_meta(net: nn.Module) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "sam_variant": net.backbone.variant.name,
        "n_md_prompts": net.md_prompts.n,
        "n_ie_prompts": net.ie_prompts.n,
        "num_classes": net.num_classes,
        "backbone_fingerprint": net.backbone.fingerprint,
        "backbone_source": net.backbone.source,
    }


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(value), sort_keys=True).encode()


def _as_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def encode_meta(meta: Mapping[str, Any]) -> torch.Tensor:
    """``ptsam_meta``: JSON padded to ``META_BYTES``, so every network's entry has one shape."""
    meta = dict(meta)
    raw = _json_bytes(meta)
    if len(raw) > META_BYTES:  # only the informative source path can be long
        meta["backbone_source"] = "..." + str(meta["backbone_source"])[len(raw) - META_BYTES + 3 :]
        raw = _json_bytes(meta)
    return _as_tensor(raw.ljust(META_BYTES, b"\0"))


def encode_json(value: Mapping[str, Any]) -> torch.Tensor:
    """JSON as a uint8 tensor: a state-dict entry every MONAI tool carries like a weight."""
    return _as_tensor(_json_bytes(value))


def decode_meta(value: Any) -> dict[str, Any] | None:
    """The JSON object in a ``ptsam_meta`` or ``ptsam_recipe`` entry; None if it is absent or not one.

    The bytes may arrive as another dtype: a federated server averages every entry of the state
    dict, and the mean of equal bytes is the same bytes as floats."""
    if not isinstance(value, torch.Tensor) or value.ndim != 1:
        return None
    if value.dtype != torch.uint8:
        if value.is_complex() or bool(((value != value.round()) | (value < 0) | (value > 255)).any()):
            return None
        value = value.to(torch.uint8)
    try:
        meta = json.loads(value.cpu().numpy().tobytes().rstrip(b"\0"))
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _describe(meta: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={meta.get(k)!r}" for k in _COMPARED)


def check_meta(entry: Any, expected: Mapping[str, Any], source: str = "the state dict") -> None:
    """Raise ``IncompatibleCheckpointError`` unless the ``ptsam_meta`` entry describes the same network."""
    found = decode_meta(entry)
    if found is None:
        raise IncompatibleCheckpointError(
            f"{source} is not a PTSAM prompt checkpoint: it has no {META_KEY!r} entry "
            f"(expected one for {_describe(expected)})"
        )
    if found.get("format") != FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{source} has PTSAM checkpoint format {found.get('format')!r}; this code reads {FORMAT_VERSION}"
        )
    diffs = [f"{k}: file {found.get(k)!r}, network {expected[k]!r}" for k in _COMPARED if found.get(k) != expected[k]]
    if diffs:
        hint = ""
        if found.get("backbone_fingerprint") != expected["backbone_fingerprint"]:
            hint = (
                f" (the prompts were trained on SAM weights {found.get('backbone_source')!r}; "
                f"this network uses {expected['backbone_source']!r})"
            )
        raise IncompatibleCheckpointError(f"{source} was trained for another network: " + "; ".join(diffs) + hint)


# Module hooks that PTSAM registers; see the module docstring.


def strip_backbone(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + BACKBONE + ".")]:
        del state_dict[key]
    # Module versions PyTorch records per sub-module: hundreds for SAM, more bytes than the prompts.
    versions = getattr(state_dict, "_metadata", {})
    for key in [k for k in versions if k == prefix + BACKBONE or k.startswith(prefix + BACKBONE + ".")]:
        del versions[key]
    state_dict[prefix + META_KEY] = encode_meta(network_meta(module))


def check_before_load(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    check_meta(state_dict.pop(prefix + META_KEY, None), network_meta(module))
    state_dict.pop(prefix + RECIPE_KEY, None)  # read by scripts.engine.recipe, not a weight
    state_dict.pop(prefix + SPLIT_KEY, None)  # read by scripts.engine.splits, not a weight
    # The backbone comes from sam_checkpoint only; a prompt file never overwrites it.
    for key in [k for k in state_dict if k.startswith(prefix + BACKBONE + ".")]:
        del state_dict[key]


def ignore_missing_backbone(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not _BACKBONE_KEY.search(k)]


# Files.


def save_prompts(
    net: nn.Module,
    path: str | Path,
    recipe: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``net``'s prompt checkpoint atomically, with the preprocessing ``recipe`` and the
    ``split`` record of the training if given."""
    state = net.state_dict()
    if recipe is not None:
        state[RECIPE_KEY] = encode_json(recipe)
    if split is not None:
        state[SPLIT_KEY] = encode_json(split)
    return atomic_torch_save(state, path)


def read_prompt_file(path: str | Path) -> Mapping[str, Any]:
    """The state dict in a prompt checkpoint (a plain one, or one under a ``"model"`` key),
    read weights-only; an error names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PTSAM prompt checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise IncompatibleCheckpointError(
            f"PTSAM prompt checkpoint {path} cannot be read as a weights-only PyTorch file: {err}"
        ) from err
    state = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(state, Mapping):
        raise IncompatibleCheckpointError(f"PTSAM prompt checkpoint {path} holds a {type(state).__name__}")
    return state


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """The preprocessing recipe recorded in a prompt checkpoint; None for files made before it was."""
    return decode_meta(read_prompt_file(path).get(RECIPE_KEY))


def read_split(path: str | Path) -> dict[str, Any] | None:
    """The split recorded in a prompt checkpoint; None for files without one (written before it
    was recorded, or a federated global model)."""
    return decode_meta(read_prompt_file(path).get(SPLIT_KEY))


def load_prompts(net: nn.Module, path: str | Path) -> None:
    """Load a prompt checkpoint into ``net``, refusing one made for another network."""
    state = read_prompt_file(path)
    check_meta(state.get(META_KEY), network_meta(net), source=f"PTSAM prompt checkpoint {path}")
    net.load_state_dict(state, strict=True)
