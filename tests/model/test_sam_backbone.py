"""SAM backbone: exact architecture, seeded random weights, official checkpoints and their refusal."""

from __future__ import annotations

import pickle
import re
import zipfile

import pytest
import torch

from helpers import quiet, stock_sam
from scripts.model.network import PTSAM
from scripts.model.sam import SamBackbone, SamCheckpointError, build_sam, get_variant, weights_fingerprint


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vit_b_is_sams_architecture():
    sam = build_sam(get_variant("vit_b"))  # segment-anything 1.0's published ViT-B sizes
    assert _count(sam.image_encoder) == 89_670_912
    assert _count(sam.prompt_encoder) == 6_220
    assert _count(sam.mask_decoder) == 4_058_340
    assert [i for i, b in enumerate(sam.image_encoder.blocks) if b.window_size == 0] == [2, 5, 8, 11]


def test_tiny_has_windowed_and_global_blocks_with_padding():
    blocks = build_sam(get_variant("tiny")).image_encoder.blocks
    assert [b.window_size for b in blocks] == [6, 0, 6, 0]
    assert 16 % blocks[0].window_size != 0  # windows are padded, as in ViT-B (64 tokens, windows of 14)


def test_random_weights_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    a = quiet(SamBackbone, "tiny", seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    b = quiet(SamBackbone, "tiny", seed=0)
    c = quiet(SamBackbone, "tiny", seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    # Position embeddings are drawn too, so random backbones exercise the positional paths.
    assert a.image_encoder.pos_embed.abs().sum() > 0
    assert a.image_encoder.blocks[1].attn.rel_pos_h.abs().sum() > 0


def test_random_and_tiny_backbones_warn():
    with pytest.warns(UserWarning, match="random weights") as record:
        SamBackbone("tiny")
    assert any("not a released SAM" in str(w.message) for w in record)


def test_backbone_is_frozen_and_prompt_encoder_trimmed():
    backbone = quiet(SamBackbone, "tiny")
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.image_encoder.training
    pe = backbone.prompt_encoder
    for gone in ("point_embeddings", "not_a_point_embed", "mask_downscaling"):
        assert not hasattr(pe, gone)
    assert backbone.dense_pe().shape == (1, 256, 16, 16)
    assert backbone.no_mask_embedding().shape == (1, 256, 1, 1)


def test_official_format_checkpoint_loads(tiny_sam_file):
    state = torch.load(tiny_sam_file, weights_only=True)
    with pytest.warns(UserWarning, match="not a released SAM"):
        backbone = SamBackbone("tiny", tiny_sam_file)
    assert backbone.fingerprint == weights_fingerprint(state)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert backbone.source == str(tiny_sam_file)


def _refused(path, variant="tiny", match=None):
    with pytest.raises(SamCheckpointError) as info:
        quiet(PTSAM, variant, path)
    message = str(info.value)
    assert str(path) in message
    assert f"expected SAM {variant}" in message
    if match:
        assert re.search(match, message, re.S), message
    return message


def test_missing_checkpoint(tmp_path):
    _refused(tmp_path / "sam_vit_b_01ec64.pth", "vit_b", "no such file.*sam_vit_b_01ec64.pth")


def test_empty_and_garbage_and_truncated_files(tmp_path, tiny_sam_file):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    _refused(empty, match="cannot be read")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 100)
    _refused(garbage, match="cannot be read")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_sam_file.read_bytes()[: tiny_sam_file.stat().st_size // 2])
    _refused(truncated, match="cannot be read")


def test_not_a_sam_state_dict(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, other)
    _refused(other, match="not a SAM state dict.*conv1.weight")
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    _refused(a_list, match="not a SAM state dict.*list")


def test_prompt_checkpoint_given_as_sam_checkpoint(tmp_path):
    model_pt = tmp_path / "model.pt"
    torch.save(quiet(PTSAM, "tiny").state_dict(), model_pt)
    _refused(model_pt, match="PTSAM prompt checkpoint")


def test_checkpoint_of_another_variant(tmp_path, tiny_sam_file):
    _refused(tiny_sam_file, "vit_b", "found embed_dim 96, 4 blocks, input 256 px: tiny")
    # The shapes that identify ViT-L, without writing 1.2 GB: the check runs before loading.
    vit_l = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16),
        "image_encoder.pos_embed": torch.zeros(1, 64, 64, 1),
        **{f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)},
    }
    path = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(vit_l, path)
    _refused(path, "vit_b", "found embed_dim 1024, 24 blocks, input 1024 px: vit_l")


def test_checkpoint_with_other_attention_layout(tmp_path):
    sam = stock_sam("tiny")
    state = sam.state_dict()
    # Block 0 saved as a global-attention block: its relative-position table has another size.
    state["image_encoder.blocks.0.attn.rel_pos_h"] = torch.zeros(31, 32)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    _refused(path, match="does not fit the architecture.*rel_pos_h")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_crafted_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": _Payload()}, path)
    _refused(path, match="cannot be read")
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Payload()))
    _refused(plain, match="cannot be read")
    assert not (tmp_path / "PWNED").exists()
    assert zipfile.is_zipfile(path)  # the torch.save format, not only raw pickles
