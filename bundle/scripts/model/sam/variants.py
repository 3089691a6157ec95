"""SAM backbone variants: the official ViT-B/L/H and a scaled-down `tiny` for tests and demos."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from .modeling import modeling

PROMPT_EMBED_DIM = 256  # width of the mask decoder's tokens, and so of the MD prompts
PATCH_SIZE = 16
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamVariant:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    window_size: int = 14
    decoder_mlp_dim: int = 2048
    official_file: str | None = None  # file name of Meta's release, for messages
    real: bool = True  # False for variants that are not a released SAM

    @property
    def embedding_size(self) -> int:
        return self.img_size // PATCH_SIZE

    def describe(self) -> str:
        return f"{self.name} (embed_dim {self.embed_dim}, {self.depth} blocks, input {self.img_size} px)"


VARIANTS: dict[str, SamVariant] = {
    v.name: v
    for v in (
        SamVariant("vit_b", 768, 12, 12, (2, 5, 8, 11), official_file="sam_vit_b_01ec64.pth"),
        SamVariant("vit_l", 1024, 24, 16, (5, 11, 17, 23), official_file="sam_vit_l_0b3195.pth"),
        SamVariant("vit_h", 1280, 32, 16, (7, 15, 23, 31), official_file="sam_vit_h_4b8939.pth"),
        # SAM's architecture scaled down: 256 px input (16 x 16 tokens), 4 blocks of width 96,
        # windowed attention in blocks 0 and 2 (6 x 6 windows, the grid padded to 18 as ViT-B
        # pads 64 to 70), global in 1 and 3; SAM's decoder with a narrower MLP.
        # Not a released model: for tests, demos and smoke runs.
        SamVariant("tiny", 96, 4, 3, (1, 3), img_size=256, window_size=6, decoder_mlp_dim=512, real=False),
    )
}


def get_variant(name: str) -> SamVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown sam_variant {name!r}; choose one of {sorted(VARIANTS)}") from None


def build_sam(variant: SamVariant) -> nn.Module:
    """segment-anything's ``Sam`` with the variant's architecture.

    Its initial weights are placeholders, to be replaced by a checkpoint or by seeded random
    weights; drawing them does not consume the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        return _build(variant)


def _build(variant: SamVariant) -> nn.Module:
    embedding = variant.embedding_size
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=variant.depth,
            embed_dim=variant.embed_dim,
            img_size=variant.img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=variant.num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=variant.global_attn_indexes,
            window_size=variant.window_size,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(embedding, embedding),
            input_image_size=(variant.img_size, variant.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(
                depth=2,
                embedding_dim=PROMPT_EMBED_DIM,
                mlp_dim=variant.decoder_mlp_dim,
                num_heads=8,
            ),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    ).eval()
