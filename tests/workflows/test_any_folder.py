"""The README's workflows from a working folder that is not the bundle's: MONAI puts the bundle
on sys.path only once a run starts, and behind the working folder, so the configs put it first
and import the bundle's code themselves."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import BUNDLE, monai_bundle
from scripts.data.datasets import load_datalist

CONFIGS = BUNDLE / "configs"


def test_train_evaluate_infer_and_verify_from_another_folder(synthetic, tmp_path):
    elsewhere = tmp_path / "work"
    (elsewhere / "scripts").mkdir(parents=True)  # a user's project with a package of that name
    (elsewhere / "scripts" / "__init__.py").write_text('raise ImportError("not the bundle\'s scripts")\n')
    data = synthetic / "microscopy"
    common = ["--bundle_root", str(BUNDLE), "--sam_variant", "tiny", "--dataset_dir", str(data)]
    common += ["--ckpt_dir", "models"]  # relative paths are the working folder's

    def run(*args: str) -> None:
        done = monai_bundle(*args, *common, cwd=elsewhere)
        assert done.returncode == 0, done.stderr[-3000:]

    run("run", "training", "--config_file", str(CONFIGS / "train.yaml"), "--epochs", "1", "--output_dir", "eval")
    assert (elsewhere / "models" / "model.pt").is_file() and (elsewhere / "eval" / "mlruns.db").is_file()

    both = json.dumps([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")])
    run("run", "evaluating", "--config_file", both, "--output_dir", "eval", "--n_overlays", "0")
    assert (elsewhere / "eval" / "metrics.csv").is_file()

    run("run", "inference", "--config_file", str(CONFIGS / "inference.yaml"), "--output_dir", "predictions")
    expected = {Path(e["image"]).stem + "_seg.tif" for e in load_datalist(data, "inference")}
    assert {p.name for p in (elsewhere / "predictions").iterdir()} == expected

    shape = "[256,256]"  # the tiny variant's input size, over the metadata's
    run(
        "verify_net_in_out", "network_def", "--config_file", str(CONFIGS / "inference.yaml"),
        "--meta_file", str(CONFIGS / "metadata.json"), "--device", "cpu",
        "--_meta_#network_data_format#inputs#image#spatial_shape", shape,
        "--_meta_#network_data_format#outputs#pred#spatial_shape", shape,
    )  # fmt: skip
