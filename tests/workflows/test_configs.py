"""The bundle's configs and metadata: public config ids, MONAI's schema and its network checks."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from monai.bundle import ConfigParser

from helpers import BUNDLE, RESOURCES, quiet
from scripts.model.network import PTSAM

SCHEMA = RESOURCES / "meta_schema_20240725.json"  # MONAI's schema, vendored: verify_metadata downloads it otherwise
METADATA = BUNDLE / "configs" / "metadata.json"
INFERENCE = BUNDLE / "configs" / "inference.yaml"


def _parse(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser.read_meta(str(METADATA))
    parser.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')", **overrides})
    return parser


def test_public_config_ids_are_present():
    config = ConfigParser.load_config_file(str(INFERENCE))
    for key in (
        "bundle_root",
        "device",
        "sam_variant",
        "sam_checkpoint",
        "n_md_prompts",
        "n_ie_prompts",
        "num_classes",
        "network_def",
        "network",
    ):
        assert key in config, key
    assert (config["sam_variant"], config["n_md_prompts"], config["n_ie_prompts"], config["num_classes"]) == (
        "vit_b",
        8,
        0,
        1,
    )


def test_overrides_of_the_public_ids_build_that_network(tiny_sam_file):
    parser = _parse(
        sam_variant="tiny", sam_checkpoint=str(tiny_sam_file), n_md_prompts=3, n_ie_prompts=2, num_classes=4
    )
    net = quiet(parser.get_parsed_content, "network")
    assert isinstance(net, PTSAM)
    assert net.backbone.variant.name == "tiny" and net.backbone.source == str(tiny_sam_file)
    assert net.md_prompts.tokens.shape == (4, 3, 256)
    assert net.ie_prompts.tokens.shape == (4, 2, 96)  # one set per block of the tiny encoder
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 4 * 3 * 256 + 4 * 2 * 96


def test_default_network_is_vit_b_md_only():
    net = quiet(_parse().get_parsed_content, "network_def")
    assert net.backbone.variant.name == "vit_b"
    assert {n: p.numel() for n, p in net.named_parameters() if p.requires_grad} == {"md_prompts.tokens": 2048}


def test_train_handlers_are_definitions_as_monai_label_needs():
    """MONAI Label inserts a CheckpointLoader into ``train#handlers`` and reads every entry's
    ``_target_``: the list must hold handler definitions (dicts), not references."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    handlers = parser.get("train#handlers")
    assert handlers and all(isinstance(h, dict) and "_target_" in h for h in handlers)


def _metadata() -> dict:
    return json.loads(METADATA.read_text())


def test_metadata_is_valid_against_monai_schema():
    jsonschema.validate(_metadata(), json.loads(SCHEMA.read_text()))
    fmt = _metadata()["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 3
    # channel_def names the written label's values (0 background, logit channel c -> c + 1),
    # as MONAI Label and the model zoo read it
    pred = fmt["outputs"]["pred"]
    assert pred["num_channels"] == 1 and pred["channel_def"] == {"0": "background", "1": "foreground"}
    broken = _metadata()
    del broken["network_data_format"]["inputs"]["image"]["dtype"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


def _monai_bundle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "monai.bundle", *args],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )


def test_monai_verify_metadata_offline():
    done = _monai_bundle("verify_metadata", "--meta_file", str(METADATA), "--filepath", str(SCHEMA))
    assert done.returncode == 0, done.stderr
    assert "metadata is verified with no error" in done.stdout + done.stderr


def test_monai_verify_net_in_out():
    """The README's command for the tiny variant: its input size given over the metadata's."""
    shape = ["[256,256]"]
    done = _monai_bundle(
        "verify_net_in_out", "network_def", "--meta_file", str(METADATA), "--config_file", str(INFERENCE),
        "--sam_variant", "tiny", "--device", "cpu",
        "--_meta_#network_data_format#inputs#image#spatial_shape", *shape,
        "--_meta_#network_data_format#outputs#pred#spatial_shape", *shape,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "data shape of network is verified with no error" in done.stdout + done.stderr
