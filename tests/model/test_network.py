"""PTSAM network: trainable counts, equivalence with stock SAM, VPT-deep prompts, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import quiet, stock_sam
from scripts.model.decoder import decode_masks
from scripts.model.encoder import encode_image, prompted_block
from scripts.model.network import PTSAM
from scripts.model.sam import PIXEL_MEAN, PIXEL_STD

MEAN = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def _trainable(net: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("variant", "n_md", "n_ie", "classes", "expected"),
    [
        ("vit_b", 8, 0, 1, 2_048),
        ("vit_b", 8, 8, 1, 2_048 + 73_728),
        ("vit_b", 8, 0, 3, 6_144),
        ("vit_l", 8, 8, 1, 2_048 + 196_608),
        ("vit_h", 8, 8, 1, 2_048 + 327_680),
    ],
)
def test_trainable_parameter_counts(variant, n_md, n_ie, classes, expected):
    net = quiet(PTSAM, variant, n_md_prompts=n_md, n_ie_prompts=n_ie, num_classes=classes)
    trainable = _trainable(net)
    assert sum(trainable.values()) == expected
    assert set(trainable) <= {"md_prompts.tokens", "ie_prompts.tokens"}
    assert not any(p.requires_grad for p in net.backbone.parameters())


def _raw_images(n: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 255


def test_no_prompts_equals_stock_sam_without_prompts(tiny_sam_file):
    """n_md = n_ie = 0: what segment-anything's own Sam.forward computes with no clicks or boxes."""
    sam = stock_sam("tiny", seed=123)  # the weights saved in tiny_sam_file
    net = quiet(PTSAM, "tiny", tiny_sam_file, n_md_prompts=0, n_ie_prompts=0, num_classes=2).eval()
    raw = _raw_images(3)
    with torch.no_grad():
        ours = net((raw - MEAN) / STD)
        stock = sam([{"image": im, "original_size": (256, 256)} for im in raw], multimask_output=False)
    for i, out in enumerate(stock):
        expected = sam.postprocess_masks(out["low_res_logits"], (256, 256), (256, 256))[0, 0]
        assert expected.abs().max() > 0.1  # a real signal, not an all-zero coincidence
        for c in range(2):  # every class without prompts is SAM's no-prompt mask
            assert (ours[i, c] - expected).abs().max() <= 1e-5


def test_decoder_prompts_are_sams_sparse_embeddings():
    """Each class's tokens act exactly as sparse prompt embeddings in SAM's MaskDecoder (ViT-B decoder)."""
    sam = stock_sam("vit_b", seed=3)
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 256, 64, 64, generator=g)
    prompts = torch.randn(3, 8, 256, generator=g)
    pe = sam.prompt_encoder.get_dense_pe()
    pe_dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    with torch.no_grad():
        ours = decode_masks(sam.mask_decoder, embeddings, pe, pe_dense, prompts)
        assert ours.shape == (2, 3, 256, 256)
        for b in range(2):
            for c in range(3):
                stock, _ = sam.mask_decoder(
                    image_embeddings=embeddings[b : b + 1],
                    image_pe=pe,
                    sparse_prompt_embeddings=prompts[c : c + 1],
                    dense_prompt_embeddings=pe_dense.expand(1, -1, 64, 64),
                    multimask_output=False,
                )
                assert (ours[b, c] - stock[0, 0]).abs().max() <= 1e-5


def _reference_prompted_encoder(encoder, image, prompts):
    """VPT-deep written out plainly: per window, full attention over [prompts, window tokens],
    SAM's relative-position bias added among image tokens only, prompt outputs dropped."""
    x = encoder.patch_embed(image) + encoder.pos_embed
    for block, block_prompts in zip(encoder.blocks, prompts, strict=True):
        attn = block.attn
        B, H, W, C = x.shape
        ws = block.window_size or H
        xn = F.pad(block.norm1(x), (0, 0, 0, (-W) % ws, 0, (-H) % ws))
        pn = block.norm1(block_prompts)
        n, heads = pn.shape[0], attn.num_heads
        out = torch.zeros_like(xn)
        ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        Rh = attn.rel_pos_h[ys[:, None] - ys[None, :] + ws - 1]  # L, L, head_dim
        Rw = attn.rel_pos_w[xs[:, None] - xs[None, :] + ws - 1]
        for b in range(B):
            for y0 in range(0, xn.shape[1], ws):
                for x0 in range(0, xn.shape[2], ws):
                    tokens = xn[b, y0 : y0 + ws, x0 : x0 + ws].reshape(-1, C)
                    q, k, v = attn.qkv(torch.cat([pn, tokens])).reshape(-1, 3, heads, C // heads).unbind(1)
                    logits = torch.einsum("qhc,khc->hqk", q * attn.scale, k)
                    q_img = q[n:]
                    bias = torch.einsum("qhc,qkc->hqk", q_img, Rh) + torch.einsum("qhc,qkc->hqk", q_img, Rw)
                    logits[:, n:, n:] += bias
                    mixed = torch.einsum("hqk,khc->qhc", logits.softmax(-1), v).reshape(-1, C)
                    out[b, y0 : y0 + ws, x0 : x0 + ws] = attn.proj(mixed[n:]).reshape(ws, ws, C)
        x = x + out[:, :H, :W]
        x = x + block.mlp(block.norm2(x))
    return encoder.neck(x.permute(0, 3, 1, 2))


def test_image_encoder_prompts_match_plain_vpt_deep():
    net = quiet(PTSAM, "tiny", n_ie_prompts=5)
    encoder, prompts = net.backbone.image_encoder, net.ie_prompts.tokens
    image = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ours = encode_image(encoder, image, prompts)
        reference = _reference_prompted_encoder(encoder, image, prompts)
        stock = encoder(image)
    assert (ours - reference).abs().max() <= 1e-5
    assert (ours - stock).abs().max() > 1e-2  # the prompts do change the embedding


def test_prompted_block_without_prompts_is_sams_block():
    encoder = quiet(PTSAM, "tiny").backbone.image_encoder
    x = torch.randn(2, 16, 16, 96)
    with torch.no_grad():
        for block in encoder.blocks:  # windowed (padded) and global
            assert (prompted_block(block, x, torch.zeros(0, 96)) - block(x)).abs().max() <= 1e-5


def test_forward_shapes_and_batch_independence():
    net = quiet(PTSAM, "tiny", n_md_prompts=4, n_ie_prompts=2, num_classes=3).eval()
    images = torch.randn(3, 3, 256, 256)
    with torch.no_grad():
        batched = net(images)
        single = net(images[1:2])
    assert batched.shape == (3, 3, 256, 256)
    assert (batched[1:2] - single).abs().max() <= 1e-5
    # each class has its own tokens, so its own mask
    assert (batched[:, 0] - batched[:, 1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"takes \(B, 3, 256, 256\).*got \(1, 3, 128, 128\)"):
        net(torch.randn(1, 3, 128, 128))


def test_gradients_reach_only_the_prompts_and_a_step_changes_only_them():
    net = quiet(PTSAM, "tiny", n_md_prompts=8, n_ie_prompts=4)
    net.train()
    assert not net.backbone.training
    frozen_before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    prompts_before = {k: p.detach().clone() for k, p in net.named_parameters() if p.requires_grad}
    optimiser = torch.optim.AdamW(net.parameters(), lr=0.1)  # handed everything, on purpose
    target = (torch.rand(2, 1, 256, 256) > 0.5).float()
    loss = F.binary_cross_entropy_with_logits(net(torch.randn(2, 3, 256, 256)), target)
    loss.backward()
    assert net.md_prompts.tokens.grad.abs().sum() > 0
    assert net.ie_prompts.tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.backbone.parameters())
    optimiser.step()
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    for name, p in net.named_parameters():
        if name in prompts_before:
            assert not torch.equal(p.detach(), prompts_before[name]), name


def test_invalid_counts_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        quiet(PTSAM, "tiny", num_classes=0)
    with pytest.raises(ValueError, match="n_md_prompts=-1"):
        quiet(PTSAM, "tiny", n_md_prompts=-1)
    with pytest.raises(ValueError, match="unknown sam_variant 'vit_x'"):
        PTSAM("vit_x")


def test_fused_attention_equals_stock_sam_blocks_at_vit_b_size():
    """The fused encoder path against segment-anything's own blocks: a windowed block (64 x 64
    tokens padded to 70 x 70 for 14 x 14 windows) and a global one, at ViT-B width."""
    net = quiet(PTSAM, "vit_b", n_md_prompts=0)
    blocks = net.backbone.image_encoder.blocks
    x = torch.randn(1, 64, 64, 768) * 0.5
    with torch.no_grad():
        for index in (0, 2):  # windowed, global
            stock = blocks[index](x)
            fused = prompted_block(blocks[index], x, torch.zeros(0, 768))
            assert (fused - stock).abs().max() <= 1e-4


def test_fused_and_reference_encoder_paths_agree_end_to_end():
    fused = quiet(PTSAM, "tiny", n_md_prompts=4).eval()
    reference = quiet(PTSAM, "tiny", n_md_prompts=4, fused_attention=False).eval()
    reference.load_state_dict(fused.state_dict())
    image = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert (fused(image) - reference(image)).abs().max() <= 1e-4


def test_activation_checkpointing_gives_the_same_gradients():
    plain = quiet(PTSAM, "tiny", n_ie_prompts=4, activation_checkpointing=False)
    saved = quiet(PTSAM, "tiny", n_ie_prompts=4, activation_checkpointing=True)
    saved.load_state_dict(plain.state_dict())
    image = torch.randn(2, 3, 256, 256)
    for net in (plain, saved):
        net(image).sigmoid().mean().backward()
    assert torch.allclose(plain.ie_prompts.tokens.grad, saved.ie_prompts.tokens.grad, atol=1e-6)
    assert plain.ie_prompts.tokens.grad.abs().sum() > 0


def test_activation_checkpointing_defaults_to_on_exactly_when_encoder_prompts_train():
    assert quiet(PTSAM, "tiny", n_ie_prompts=4).activation_checkpointing is True
    assert quiet(PTSAM, "tiny", n_ie_prompts=0).activation_checkpointing is False
    assert quiet(PTSAM, "tiny", n_ie_prompts=4, activation_checkpointing="false").activation_checkpointing is False


def test_network_runs_under_autocast_close_to_fp32():
    """The `amp` knob runs forward and backward under autocast (bfloat16 here, on the CPU):
    fused attention with its bias mask, prompts and query chunks must all take it."""
    net = quiet(PTSAM, "tiny", n_md_prompts=4, n_ie_prompts=4)
    with torch.no_grad():
        net.ie_prompts.tokens.normal_(0, 0.02)
    image = torch.randn(2, 3, 256, 256)
    reference = net(image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(image)
    assert low.dtype == torch.bfloat16
    low.float().sigmoid().mean().backward()
    assert (low.float() - reference).abs().max() <= 0.05 * reference.abs().max()
    assert net.ie_prompts.tokens.grad.abs().sum() > 0 and net.md_prompts.tokens.grad.abs().sum() > 0


def test_query_chunked_global_attention_equals_the_whole():
    """Global attention in query chunks (the ONNX export), checkpointed or not (activation
    checkpointing): the same outputs and the same gradients as all queries at once."""
    from scripts.model.encoder import prompted_attention

    block = quiet(PTSAM, "tiny").backbone.image_encoder.blocks[1]  # a global block, 16 x 16 tokens
    x = torch.randn(2, 16, 16, 96)
    results = []
    for chunk, checkpointed in ((None, False), (64, False), (64, True), (96, False)):  # 96: a short last chunk
        prompts = torch.randn(5, 96, generator=torch.Generator().manual_seed(0)).requires_grad_()
        out = prompted_attention(block.attn, x, prompts, query_chunk=chunk, checkpoint_chunks=checkpointed)
        out.pow(2).mean().backward()
        results.append((out.detach(), prompts.grad))
    for out, grad in results[1:]:
        assert (results[0][0] - out).abs().max() <= 1e-5
        assert torch.allclose(results[0][1], grad, atol=1e-6) and grad.abs().sum() > 0
