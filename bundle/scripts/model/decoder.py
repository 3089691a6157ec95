"""SAM's mask decoder driven by learned prompt tokens, all classes in one batched pass.

SAM's ``MaskDecoder.predict_masks`` expects one image and many prompt sets. Here B images
and C classes are decoded together: every (image, class) pair is one row of the batch,
with the class's tokens where SAM puts its sparse (point/box) embeddings and the no-mask
embedding as the dense prompt. Only SAM's single-mask output (the first mask token) is
computed, as with ``multimask_output=False``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def decode_masks(
    decoder: nn.Module,
    embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    dense_prompt: torch.Tensor,
    prompts: torch.Tensor,
) -> torch.Tensor:
    """Low-resolution mask logits (B, C, 4h, 4w).

    embeddings: (B, 256, h, w) image embeddings; image_pe: (1, 256, h, w);
    dense_prompt: (1, 256, 1, 1) no-mask embedding, or (B, 256, h, w);
    prompts: (C, n, 256) shared by all images, or (B, C, n, 256) per image.
    """
    B = embeddings.shape[0]
    if prompts.ndim == 3:
        prompts = prompts.expand(B, -1, -1, -1)
    C, n = prompts.shape[1], prompts.shape[2]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    # row b * C + c: image b, class c
    tokens = torch.cat([output_tokens.expand(B * C, -1, -1), prompts.reshape(B * C, n, prompts.shape[-1])], dim=1)
    src = (embeddings + dense_prompt).repeat_interleave(C, dim=0)
    pos = image_pe.expand(B * C, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    mask_token_out = hs[:, 1, :]  # first mask token: SAM's single-mask output
    upscaled = decoder.output_upscaling(src.transpose(1, 2).view(b, c, h, w))  # B*C, 32, 4h, 4w
    hyper = decoder.output_hypernetworks_mlps[0](mask_token_out)  # B*C, 32
    masks = hyper.unsqueeze(1) @ upscaled.flatten(2)  # B*C, 1, 16hw
    return masks.view(B, C, upscaled.shape[-2], upscaled.shape[-1])
