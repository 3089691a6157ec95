"""SAM's image encoder with VPT-deep prompts joining the attention of every block.

Each block gets its own ``n`` prompt tokens. They pass the block's first LayerNorm and qkv
projection like image tokens and serve as extra keys and values; a windowed block shares
the same prompts with every window, a global block sees them once. The relative-position
bias exists only among image tokens. Prompt outputs are dropped after the block, so their
queries are never computed: the kept outputs equal those of full attention over
``[prompts, image tokens]``.
"""

from __future__ import annotations

import hashlib
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .sam.modeling import image_encoder as sam_image_encoder

QUERY_CHUNK = 512  # queries per chunk of a global block's attention under activation checkpointing


@cache
def encoder_version() -> str:
    """A hash of this module's code: what caches of its outputs are keyed by."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def encode_image(
    encoder: nn.Module,
    image: torch.Tensor,
    prompts: torch.Tensor | None,
    fused: bool = True,
    checkpointing: bool = False,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 256, S/16, S/16). ``prompts``: (depth, n, dim), or None.

    ``fused``: attention by ``scaled_dot_product_attention`` with the relative-position bias as
    its mask (faster, equal to SAM's within float rounding); ``False`` without prompts runs
    segment-anything's own encoder unchanged (the reference). ``checkpointing``: when gradients
    flow (image-encoder prompts in training), keep only each block's input and recompute the
    rest in the backward pass, global attention in query chunks: much less memory for some
    more time. ``query_chunk``: global attention in chunks of that many queries without
    checkpointing (the ONNX export: an engine without a fused attention kernel reads and writes
    the whole (heads, H*W, H*W) matrix once per operation, 0.8 GB a pass on ViT-B).
    """
    if not fused and (prompts is None or prompts.shape[1] == 0):
        return encoder(image)
    x = encoder.patch_embed(image)  # B, h, w, dim
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for i, block in enumerate(encoder.blocks):
        block_prompts = prompts[i] if prompts is not None else x.new_zeros(0, x.shape[-1])
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(prompted_block, block, x, block_prompts, QUERY_CHUNK, True, use_reentrant=False)
        else:
            x = prompted_block(block, x, block_prompts, query_chunk)
    return encoder.neck(x.permute(0, 3, 1, 2))


def prompted_block(
    block: nn.Module,
    x: torch.Tensor,
    prompts: torch.Tensor,
    query_chunk: int | None = None,
    checkpoint_chunks: bool = False,
) -> torch.Tensor:
    """SAM's ``Block.forward`` with ``prompts`` (n, dim) as extra keys and values.

    A windowed block projects its tokens to queries, keys and values before cutting windows,
    filling the padding with what SAM's zero tokens project to, and projects the output after
    cropping: SAM runs both projections on the padded grid, 70 x 70 tokens instead of 64 x 64 on
    ViT-B (+20 % in those layers), for the same result.
    """
    attn, ws = block.attn, block.window_size
    shortcut = x
    x = block.norm1(x)
    prompts = block.norm1(prompts) if prompts.shape[0] else prompts
    qkv, prompt_kv = _project(attn.qkv, x, prompts)  # B, H, W, 3 * dim; n, 2 * dim
    if ws > 0:
        H, W = x.shape[1], x.shape[2]
        qkv, pad_hw = sam_image_encoder.window_partition(_pad_with(qkv, _bias(attn.qkv, qkv), ws), ws)
    x = _attend(attn, qkv, prompt_kv, query_chunk, checkpoint_chunks)
    if ws > 0:
        x = sam_image_encoder.window_unpartition(x, ws, pad_hw, (H, W))
    x = shortcut + attn.proj(x)
    return x + block.mlp(block.norm2(x))


# A layer is called once per block: a weight used twice reaches the ONNX export as a transposed
# copy, which ONNX Runtime's int8 quantisation does not recognise as a weight (such layers stayed
# float32: the windowed blocks' qkv, and every qkv with image-encoder prompts).


def _project(qkv: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projections of tokens ``x`` (B, H, W, dim), and the keys and values of ``prompts``
    (n, dim) as (n, 2 * dim), in one call of the layer."""
    B, H, W, dim = x.shape
    n = prompts.shape[0]
    if not n:
        return qkv(x), x.new_zeros(0, 2 * dim)
    both = qkv(torch.cat([prompts.to(x.dtype).expand(B, n, dim), x.reshape(B, H * W, dim)], dim=1))
    return both[:, n:].reshape(B, H, W, -1), both[0, :n, dim:]


def _bias(linear: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """What ``linear`` maps a zero token to: its bias, read, not computed (called once, above)."""
    bias = linear.bias() if callable(linear.bias) else linear.bias  # a method on torch.ao's int8 layers
    return like.new_zeros(like.shape[-1]) if bias is None else bias.to(like.dtype)


def _pad_with(t: torch.Tensor, value: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) padded at the bottom and right to multiples of ``window`` with ``value`` (C,)."""
    B, H, W, C = t.shape
    ph, pw = -H % window, -W % window
    if not (ph or pw):
        return t
    if pw:
        t = torch.cat([t, value.expand(B, H, pw, C)], dim=2)
    if ph:
        t = torch.cat([t, value.expand(B, ph, W + pw, C)], dim=1)
    return t


def prompted_attention(
    attn: nn.Module,
    x: torch.Tensor,
    prompts: torch.Tensor,
    query_chunk: int | None = None,
    checkpoint_chunks: bool = False,
) -> torch.Tensor:
    """SAM's ``Attention.forward`` on (B, H, W, dim) windows, attending also to ``prompts``.

    ``query_chunk``: when set and exceeded (global blocks), queries are processed in chunks, so
    no full (H*W x H*W) attention matrix ever exists; with ``checkpoint_chunks`` each chunk is
    checkpointed (training with activation checkpointing). The result is the same.
    """
    qkv, prompt_kv = _project(attn.qkv, x, prompts)
    return attn.proj(_attend(attn, qkv, prompt_kv, query_chunk, checkpoint_chunks))


def _attend(
    attn: nn.Module,
    qkv: torch.Tensor,
    prompt_kv: torch.Tensor,
    query_chunk: int | None = None,
    checkpoint_chunks: bool = False,
) -> torch.Tensor:
    """``prompted_attention`` from the windows' projections (B, H, W, 3 * dim) and the prompts'
    keys and values (n, 2 * dim), before the output projection: (B, H, W, dim)."""
    B, H, W, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3
    L, n, heads = H * W, prompt_kv.shape[0], attn.num_heads
    head_dim = dim // heads
    qkv = qkv.reshape(B, L, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # B, heads, L, head_dim
    if n:  # the prompts' keys and values are computed once and shared by every window
        kv_p = prompt_kv.reshape(n, 2, heads, head_dim).permute(1, 2, 0, 3)
        k = torch.cat([kv_p[0].expand(B, -1, -1, -1), k], dim=2)  # B, heads, n + L, head_dim
        v = torch.cat([kv_p[1].expand(B, -1, -1, -1), v], dim=2)
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        rel_h, rel_w = rel_pos_terms(q, attn.rel_pos_h, attn.rel_pos_w, (H, W))  # B, heads, L, H | W
        if query_chunk is None or L <= query_chunk:
            out = _biased_attention(q, k, v, rel_h, rel_w, n, attn.scale)
        else:
            run = (
                partial(checkpoint, _biased_attention, use_reentrant=False) if checkpoint_chunks else _biased_attention
            )
            chunks = [
                run(
                    q[:, :, i : i + query_chunk],
                    k,
                    v,
                    rel_h[:, :, i : i + query_chunk],
                    rel_w[:, :, i : i + query_chunk],
                    n,
                    attn.scale,
                )
                for i in range(0, L, query_chunk)
            ]
            out = torch.cat(chunks, dim=2)
    return out.transpose(1, 2).reshape(B, H, W, dim)


def _biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, n: int, scale: float
) -> torch.Tensor:
    """Attention of queries (B, heads, l, c) over [n prompt keys, L image keys] with SAM's
    relative-position bias among image tokens only."""
    B, heads, rows = q.shape[:3]
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, heads, rows, -1)  # B, heads, l, L
    if n:
        bias = F.pad(bias, (n, 0))  # no positional bias towards the prompts
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed relative-position terms for queries (B, heads, H*W, c): the height term
    (B, heads, H*W, H) and the width term (B, heads, H*W, W); the bias towards key (y, x) is
    their sum at y and x."""
    H, W = size
    Rh = sam_image_encoder.get_rel_pos(H, H, rel_pos_h)  # H, H, c
    Rw = sam_image_encoder.get_rel_pos(W, W, rel_pos_w)  # W, W, c
    B, heads, L, c = q.shape
    r_q = q.reshape(B, heads, H, W, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh).reshape(B, heads, L, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw).reshape(B, heads, L, W)
    return rel_h, rel_w
