"""SAM weights: official checkpoint files, seeded random weights, and a weight fingerprint."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ...common.flags import flag
from .variants import PATCH_SIZE, VARIANTS, SamVariant

_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
# Keys every official SAM checkpoint has; their shapes identify the variant.
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_POS_KEY = "image_encoder.pos_embed"


class SamCheckpointError(ValueError):
    """A SAM checkpoint that is missing, unreadable, not SAM, or of another variant."""


class MissingSamWeightsError(RuntimeError):
    """A workflow asked to run a released SAM variant on random weights."""


def official_checkpoint(variant: str, models_dir: str | Path) -> str | None:
    """Meta's checkpoint file of ``variant`` in ``models_dir`` (where ``download_large_files``
    puts it) when it is there; None otherwise."""
    name = VARIANTS[variant].official_file if variant in VARIANTS else None
    path = Path(models_dir) / name if name else None
    return str(path) if path is not None and path.is_file() else None


def require_weights(variant: str, checkpoint: str | Path | None, allow_random_weights: bool = False) -> None:
    """Stop a training, evaluation or inference of a released variant (vit_b/l/h) that has no
    checkpoint, unless random weights are asked for: their predictions mean nothing. Building
    the network alone (tests, MONAI's verify_net_in_out and ckpt_export) only warns."""
    info = VARIANTS.get(variant)
    if checkpoint is not None or info is None or not info.real or flag(allow_random_weights):
        return
    raise MissingSamWeightsError(
        f"no SAM {variant} weights: put Meta's checkpoint {info.official_file} in the bundle's models/ folder "
        "(`cd bundle && python -m monai.bundle download_large_files` fetches ViT-B; large_files.yml names "
        "ViT-L and ViT-H), or pass `--sam_checkpoint /path/to/file`. To run on random weights anyway "
        "(timing, smoke tests), pass `--allow_random_weights true`."
    )


def random_sam_weights(sam: nn.Module, seed: int) -> None:
    """Fill ``sam`` with weights drawn from ``seed``: the same weights on every call.

    SAM initialises its absolute and relative position embeddings to zero; they are drawn
    here too, so that a random backbone exercises every path a trained one does.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in sam.modules():
            if module is not sam and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for name, param in sam.named_parameters():
            if name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
                nn.init.trunc_normal_(param, std=0.02)
        for name, buf in sam.named_buffers():
            if name.endswith("positional_encoding_gaussian_matrix"):
                buf.copy_(torch.randn_like(buf))


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of the weights' names, shapes, dtypes and values (order independent)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _architecture(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(embed_dim, depth, img_size) of the image encoder a state dict holds."""
    embed_dim = state[_PATCH_KEY].shape[0]
    depth = len({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    img_size = state[_POS_KEY].shape[1] * PATCH_SIZE if _POS_KEY in state else -1
    return embed_dim, depth, img_size


def _name_of(arch: tuple[int, int, int]) -> str:
    for v in VARIANTS.values():
        if (v.embed_dim, v.depth, v.img_size) == arch:
            return v.name
    return "no known variant"


def _expected(variant: SamVariant) -> str:
    official = f", as in Meta's {variant.official_file}" if variant.official_file else ""
    return f"expected SAM {variant.describe()}{official}"


def read_sam_checkpoint(path: str | Path, variant: SamVariant) -> dict[str, torch.Tensor]:
    """Read an official-format SAM state dict with ``weights_only=True`` and check its variant."""
    path = Path(path)
    expected = _expected(variant)
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint {path}: no such file ({expected})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, empty, or a pickle that is more than weights
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SamCheckpointError(
            f"SAM checkpoint {path} cannot be read as a weights-only PyTorch file ({expected}); found: {reason}"
        ) from err
    if not isinstance(state, Mapping):
        raise SamCheckpointError(
            f"SAM checkpoint {path} is not a SAM state dict ({expected}); found a {type(state).__name__}"
        )
    if "ptsam_meta" in state:
        raise SamCheckpointError(
            f"SAM checkpoint {path} is a PTSAM prompt checkpoint (model.pt), not SAM weights ({expected})"
        )
    if _PATCH_KEY not in state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(list(map(str, state))[:5]) or "no keys"
        raise SamCheckpointError(f"SAM checkpoint {path} is not a SAM state dict ({expected}); found keys: {keys}")
    arch = _architecture(state)
    if arch != (variant.embed_dim, variant.depth, variant.img_size):
        raise SamCheckpointError(
            f"SAM checkpoint {path} does not match sam_variant {variant.name!r} ({expected}); found "
            f"embed_dim {arch[0]}, {arch[1]} blocks, input {arch[2]} px: {_name_of(arch)}"
        )
    return dict(state)


def load_sam_checkpoint(sam: nn.Module, path: str | Path, variant: SamVariant) -> None:
    """Load an official-format checkpoint into ``sam``; every key must match."""
    state = read_sam_checkpoint(path, variant)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SamCheckpointError(
            f"SAM checkpoint {path} does not fit the architecture ({_expected(variant)}): {err}"
        ) from err
