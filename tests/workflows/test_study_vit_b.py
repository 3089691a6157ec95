"""The study's command on ViT-B as a user runs it with Meta's checkpoint in the bundle's models/:
here random weights saved in the official format at that path (no SAM weights on our machines),
1024 px input, the decoder baseline at its real size."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import BUNDLE, monai_bundle, stock_sam
from scripts.demo.synthetic import generate
from scripts.model.prompt_file import decode_meta
from scripts.model.sam import get_variant, weights_fingerprint

# SAM's mask decoder on ViT-B: the paper's "about 4.06 M" of the decoder baseline.
VIT_B_DECODER_PARAMETERS = 4_058_340


@pytest.mark.slow
def test_the_study_on_an_official_vit_b_checkpoint(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "predictions", "*.pt", "*.ckpt", "*.pth"))
    sam = stock_sam("vit_b", seed=3)
    assert sum(p.numel() for p in sam.mask_decoder.parameters()) == VIT_B_DECODER_PARAMETERS
    state = sam.state_dict()
    torch.save(state, bundle / "models" / get_variant("vit_b").official_file)  # Meta's file: a plain state dict
    del sam

    generate(str(tmp_path / "data"), seed=0, n_train=2, n_val=1, n_test=1, modalities="microscopy")
    out = tmp_path / "eval"
    grid = ["--grid_shots", "[1]", "--grid_md_prompts", "[2]", "--grid_ie_prompts", "[0]", "--grid_seeds", "[0]"]
    done = monai_bundle(
        "run", "study", "--config_file", "['configs/train.yaml','configs/study.yaml']",
        "--dataset_dir", str(tmp_path / "data" / "microscopy"), "--output_dir", str(out), *grid,
        "--epochs", "1", "--cache_dir", str(tmp_path / "cache"), cwd=bundle,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "study 2/2 shots1_md8_decoder_seed0: test Dice" in done.stdout

    cells = {p.parent.name: json.loads(p.read_text()) for p in (out / "study").glob("cells/*/result.json")}
    prompts, decoder = cells["shots1_md2_ie0_seed0"], cells["shots1_md8_decoder_seed0"]
    assert prompts["trainable_parameters"] == 2 * 256
    assert decoder["trainable_parameters"] == VIT_B_DECODER_PARAMETERS + 8 * 256  # with n_md_prompts tokens
    assert prompts["n_test_images"] == decoder["n_test_images"] == 1
    assert 0.0 <= prompts["test_dice"] <= 1.0 and 0.0 <= decoder["test_dice"] <= 1.0

    # The prompts were trained on the checkpoint found in models/, not on weights drawn at random.
    saved = torch.load(out / "study" / "cells" / "shots1_md2_ie0_seed0" / "model.pt", weights_only=True)
    meta = decode_meta(saved["ptsam_meta"])
    assert meta["sam_variant"] == "vit_b" and meta["n_md_prompts"] == 2
    assert meta["backbone_fingerprint"] == weights_fingerprint(state)
    # ViT-B's image embeddings in the study's cache: 256 x 64 x 64 per image (1024 px input).
    cached = sorted((tmp_path / "cache").rglob("*.pt"))
    assert cached, "no embedding cache written"
    assert tuple(torch.load(cached[0], weights_only=True).shape[-3:]) == (256, 64, 64)
