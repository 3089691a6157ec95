"""PTSAM: a frozen SAM steered by learned prompt tokens (Piater et al., CVPRW 2025)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common.flags import flag, optional_flag
from . import prompt_file
from .decoder import decode_masks
from .encoder import encode_image
from .prompts import ImageEncoderPrompts, MaskDecoderPrompts
from .runtime import EncoderRuntime, check_engine, precision_of
from .sam import PROMPT_EMBED_DIM, SamBackbone


class PTSAM(nn.Module):
    """Prompt-tuned SAM: ``forward(image)`` maps (B, 3, S, S) SAM-normalised images to
    (B, num_classes, S, S) logits, S being the variant's input size (1024, or 256 for `tiny`).

    Trained: ``num_classes`` x ``n_md_prompts`` mask-decoder tokens of width 256, and
    optionally ``n_ie_prompts`` image-encoder tokens per ViT block. Everything of SAM is
    frozen. With no prompts at all it computes what SAM computes without clicks or boxes.

    ``fused_attention`` (default) runs the encoder's attention as one fused kernel;
    ``activation_checkpointing`` trades time for memory when image-encoder prompts train; by
    default (None) it is on exactly then (ViT-B MD+IE at batch 4: 3 GB of GPU memory instead of 24).
    ``backbone``: a ``SamBackbone`` already built for ``sam_variant`` (a study's cells share one).
    ``encoder_engine`` (``torch`` | ``onnxruntime`` | ``openvino``), ``encoder_int8`` and
    ``encoder_bf16``: the encoder's inference fast paths on a CPU (``runtime.py``); inference only.
    """

    def __init__(
        self,
        sam_variant: str = "vit_b",
        sam_checkpoint: str | Path | None = None,
        n_md_prompts: int = 8,
        n_ie_prompts: int = 0,
        num_classes: int = 1,
        backbone_seed: int = 0,
        fused_attention: bool = True,
        activation_checkpointing: bool | None = None,
        backbone: SamBackbone | None = None,
        encoder_engine: str = "torch",
        encoder_int8: bool = False,
        encoder_bf16: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if n_md_prompts < 0 or n_ie_prompts < 0:
            raise ValueError(
                f"prompt counts must be >= 0, got n_md_prompts={n_md_prompts}, n_ie_prompts={n_ie_prompts}"
            )
        self.num_classes = num_classes
        self.encoder_engine = encoder_engine
        self.encoder_int8, self.encoder_bf16 = flag(encoder_int8), flag(encoder_bf16)
        check_engine(self.encoder_engine, self.encoder_precision)
        self._runtime: EncoderRuntime | None = None  # built at the first fast-path call
        self.query_chunk: int | None = None  # global attention in query chunks (set while exporting)
        self.fused_attention = flag(fused_attention)
        checkpointing = optional_flag(activation_checkpointing)
        self.activation_checkpointing = n_ie_prompts > 0 if checkpointing is None else checkpointing
        if backbone is None:
            backbone = SamBackbone(sam_variant, sam_checkpoint, seed=backbone_seed)
        self.backbone = backbone
        variant = self.backbone.variant
        self.img_size = variant.img_size
        self.md_prompts = MaskDecoderPrompts(num_classes, n_md_prompts, PROMPT_EMBED_DIM)
        self.ie_prompts = ImageEncoderPrompts(variant.depth, n_ie_prompts, variant.embed_dim)

        self.register_state_dict_post_hook(prompt_file.strip_backbone)
        self.register_load_state_dict_pre_hook(prompt_file.check_before_load)
        self.register_load_state_dict_post_hook(prompt_file.ignore_missing_backbone)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> image embeddings (B, 256, S/16, S/16)."""
        self._check_input(image)
        if self.encoder_engine != "torch" or self.encoder_precision != "float32":
            return self._fast_encoder()(image)
        return encode_image(
            self.backbone.image_encoder,
            image,
            self.ie_prompts.tokens,
            self.fused_attention,
            self.activation_checkpointing,
            self.query_chunk,
        )

    @property
    def encoder_precision(self) -> str:
        """float32 | int8 | bfloat16: what ``encoder_int8`` and ``encoder_bf16`` ask of the encoder."""
        return precision_of(self.encoder_int8, self.encoder_bf16)

    def _fast_encoder(self) -> EncoderRuntime:
        """The runtime for the current weights and image-encoder prompts (rebuilt if they change)."""
        # Gradients are what an engine cannot carry (a training step would not reach the prompts).
        # Train or eval mode computes the same encoder (no dropout, no batch statistics): evaluation's
        # embedding cache encodes in the data loader, between the evaluator's eval-mode iterations.
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"encoder_engine={self.encoder_engine!r} / encoder precision {self.encoder_precision} are inference "
                "paths: call the network under torch.no_grad(), or train with the defaults"
            )
        prompts = self.ie_prompts.tokens if self.ie_prompts.n else None
        key = self.backbone.fingerprint
        runtime = self._runtime
        precision = self.encoder_precision
        if runtime is None or not runtime.matches(self.encoder_engine, precision, prompts, key):
            runtime = EncoderRuntime(
                self.encoder_engine, precision, self.backbone.image_encoder, prompts, key, self.img_size
            )
            self._runtime = runtime
        return runtime

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["_runtime"] = None  # an engine session is rebuilt, never copied or pickled
        return state

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Image embeddings -> low-resolution logits (B, num_classes, S/4, S/4)."""
        return decode_masks(
            self.backbone.mask_decoder,
            embeddings,
            self.backbone.dense_pe(),
            self.backbone.no_mask_embedding(),
            self.md_prompts.tokens,
        )

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits -> logits at the input size, as SAM's ``postprocess_masks``."""
        return F.interpolate(low_res, (self.img_size, self.img_size), mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor, embedded: bool = False) -> torch.Tensor:
        """Logits (B, num_classes, S, S) for images (B, 3, S, S), or with ``embedded=True`` for
        their image embeddings (B, 256, S/16, S/16) from ``encode`` (what the embedding cache feeds)."""
        if embedded:
            self._check_embedding(image)
            return self.upsample(self.decode(image))
        return self.upsample(self.decode(self.encode(image)))

    def train(self, mode: bool = True) -> PTSAM:
        super().train(mode)
        self.backbone.eval()
        return self

    def _check_embedding(self, x: torch.Tensor) -> None:
        size = self.img_size // 16
        if x.ndim != 4 or x.shape[1] != PROMPT_EMBED_DIM or tuple(x.shape[-2:]) != (size, size):
            raise ValueError(
                f"PTSAM {self.backbone.variant.name} decodes (B, {PROMPT_EMBED_DIM}, {size}, {size}) image "
                f"embeddings, got {tuple(x.shape)}"
            )

    def _check_input(self, image: torch.Tensor) -> None:
        size = (self.img_size, self.img_size)
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != size:
            raise ValueError(
                f"PTSAM {self.backbone.variant.name} takes (B, 3, {self.img_size}, {self.img_size}) "
                f"SAM-normalised images, got {tuple(image.shape)}"
            )
