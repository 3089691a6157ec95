"""Real SAM weights by default: the official file in models/ is used when it is there, and a
released variant never runs a workflow on random weights unless asked to."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from helpers import BUNDLE, monai_bundle, quiet
from scripts.model.sam import MissingSamWeightsError, require_weights


def _bundle_copy(target: Path) -> Path:
    shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("eval", "predictions", "*.pt", "*.ckpt", "*.pth"))
    return target


@pytest.mark.parametrize("config", ["train.yaml", "inference.yaml"])
def test_the_official_file_in_models_is_the_default_checkpoint(tmp_path, config):
    bundle = _bundle_copy(tmp_path / "bundle")
    for variant, name in (("vit_b", "sam_vit_b_01ec64.pth"), ("vit_h", "sam_vit_h_4b8939.pth")):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / config))
        parser.update({"bundle_root": str(bundle), "sam_variant": variant})
        assert parser.get_parsed_content("sam_checkpoint") is None  # not downloaded yet
        (bundle / "models" / name).write_bytes(b"")  # as download_large_files leaves it
        parser.parse(reset=True)
        assert parser.get_parsed_content("sam_checkpoint") == str(bundle / "models" / name)


def test_a_released_variant_without_weights_stops_before_any_work(synthetic, tmp_path):
    out = tmp_path / "out"
    args = ["--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(out / "eval")]
    args += ["--ckpt_dir", str(out / "models"), "--bundle_root", str(_bundle_copy(tmp_path / "bundle"))]
    for run_id, config in (("training", "configs/train.yaml"), ("inference", "configs/inference.yaml")):
        done = monai_bundle("run", run_id, "--config_file", config, *args)
        assert done.returncode != 0
        assert "no SAM vit_b weights: put Meta's checkpoint sam_vit_b_01ec64.pth in the bundle's models/" in done.stderr
        assert "download_large_files" in done.stderr and "--allow_random_weights true" in done.stderr
    assert not out.exists()  # nothing written, nothing trained


def test_random_weights_when_asked_and_for_the_network_alone():
    with pytest.raises(MissingSamWeightsError, match="sam_vit_l_0b3195.pth"):
        require_weights("vit_l", None)
    require_weights("vit_b", None, allow_random_weights="true")  # as the command line spells it
    require_weights("vit_b", "/weights/sam_vit_b_01ec64.pth")
    require_weights("tiny", None)  # not a released model: tests and demos
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    # No checkpoint, whatever a user has put in bundle/models/ (download_large_files puts ViT-B there).
    parser.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')", "sam_checkpoint": None})
    net = quiet(parser.get_parsed_content, "network_def")  # verify_net_in_out and ckpt_export build it alone
    assert net.backbone.random and net.backbone.variant.name == "vit_b"
