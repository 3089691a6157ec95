"""The frozen SAM backbone of PTSAM: SAM without the prompt encoder's point, box and mask parts."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .variants import build_sam, get_variant
from .weights import load_sam_checkpoint, random_sam_weights, weights_fingerprint

# Prompt-encoder parts PTSAM never uses: it takes no clicks, boxes or mask inputs.
_UNUSED_PROMPT_PARTS = ("point_embeddings", "not_a_point_embed", "mask_downscaling")


class SamBackbone(nn.Module):
    """SAM's image encoder, mask decoder and the two frozen prompt-encoder pieces the
    no-prompt path needs: the dense positional encoding and the no-mask embedding.

    Nothing here trains: every parameter is frozen and the module stays in eval mode.
    """

    def __init__(self, variant: str = "vit_b", checkpoint: str | Path | None = None, seed: int = 0):
        super().__init__()
        self.variant = get_variant(variant)
        sam = build_sam(self.variant)
        if checkpoint is None:
            random_sam_weights(sam, seed)
            warnings.warn(
                f"sam_checkpoint is null: SAM {self.variant.name} has random weights (seed {seed}); "
                "predictions mean nothing until it is given an official checkpoint",
                stacklevel=2,
            )
        else:
            load_sam_checkpoint(sam, checkpoint, self.variant)
        if not self.variant.real:
            warnings.warn(
                f"sam_variant {self.variant.name!r} is a scaled-down SAM for tests and demos, not a released SAM model",
                stacklevel=2,
            )
        self.random = checkpoint is None
        self.source = str(checkpoint) if checkpoint is not None else f"random(seed={seed})"
        self.fingerprint = weights_fingerprint(sam.state_dict())

        for part in _UNUSED_PROMPT_PARTS:
            delattr(sam.prompt_encoder, part)
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SamBackbone:
        return super().train(False)  # frozen: eval behaviour always

    def dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, (1, 256, h, w)."""
        return self.prompt_encoder.get_dense_pe()

    def no_mask_embedding(self) -> torch.Tensor:
        """The dense prompt SAM uses when no mask is given, (1, 256, 1, 1)."""
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
