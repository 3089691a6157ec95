"""Federated prompt tuning with MONAI FL's own client (`MonaiAlgo`, what NVIDIA FLARE runs for
MONAI bundles) on train.yaml + fl_train.yaml: two sites, a FedAvg server step, three rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from helpers import BUNDLE, quiet
from scripts.data.datasets import load_datalist
from scripts.demo.synthetic import generate
from scripts.model.network import PTSAM
from scripts.model.prompt_file import IncompatibleCheckpointError

CONFIGS = ["configs/train.yaml", "configs/fl_train.yaml"]


def _site(name: str, dataset: Path, out: Path, generalist: Path, local_epochs: int = 2) -> MonaiAlgo:
    overrides = {
        "dataset_dir": str(dataset),
        "output_dir": str(out / name / "eval"),
        "ckpt_dir": str(out / name / "models"),
        "sam_variant": "tiny",
        "sam_checkpoint": str(generalist),
        "device": "$torch.device('cpu')",
    }
    algo = MonaiAlgo(
        bundle_root=str(BUNDLE),
        local_epochs=local_epochs,
        config_train_filename=CONFIGS,
        train_kwargs=dict(overrides),
        config_evaluate_filename=CONFIGS,
        eval_kwargs={**overrides, "tracking_enabled": False},
    )
    quiet(algo.initialize, extra={ExtraItems.CLIENT_NAME: name})
    return algo


def _fedavg(global_weights: dict, updates: list[dict], kind: WeightType) -> dict:
    """The server's step: the mean of the sites' weights, or the global plus their mean change."""
    out = {}
    for key, value in global_weights.items():
        mean = torch.stack([u[key].double() for u in updates]).mean(0)
        out[key] = (value.double() + mean if kind == WeightType.WEIGHT_DIFF else mean).to(value.dtype)
    return out


def _held_out_dice(prompts: dict, dataset: Path, generalist: Path, out: Path) -> float:
    """Mean Dice of ``prompts`` on test images that neither site has."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / CONFIGS[0]))
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(dataset),
            "output_dir": str(out / "eval"),
            "sam_variant": "tiny",
            "sam_checkpoint": str(generalist),
            "device": "$torch.device('cpu')",
            "tracking_enabled": False,
        }
    )
    parser["validate#dataset#data"] = load_datalist(dataset, "test")
    evaluator = quiet(parser.get_parsed_content, "validate#evaluator")
    parser.get_parsed_content("network").load_state_dict(prompts)
    evaluator.run()
    return float(evaluator.state.metrics["val_mean_dice"])


@pytest.mark.slow
def test_two_sites_three_rounds_start_from_the_global_prompts_and_learn(generalist, tmp_path):
    data = tmp_path / "data"
    for seed, name in ((1, "site_a"), (2, "site_b")):  # different images at each site
        generate(str(data / name), seed=seed, n_train=6, n_val=2, n_test=0, modalities="microscopy")
    generate(str(data / "held_out"), seed=3, n_train=1, n_val=1, n_test=4, modalities="microscopy")
    sites = [_site(name, data / name / "microscopy", tmp_path, generalist) for name in ("site_a", "site_b")]
    starts: list[list[torch.Tensor]] = [[], []]
    for algo, seen in zip(sites, starts, strict=True):
        algo.trainer.add_event_handler(
            Events.EPOCH_STARTED, lambda e, seen=seen: seen.append(e.network.md_prompts.tokens.detach().clone())
        )

    held_out = data / "held_out" / "microscopy"
    global_weights = quiet(PTSAM, "tiny", str(generalist)).state_dict()
    dice = [_held_out_dice(global_weights, held_out, generalist, tmp_path / "score")]
    for round_ in range(3):
        sent = {k: v.clone() for k, v in global_weights.items()}
        updates = []
        for algo, seen in zip(sites, starts, strict=True):
            algo.train(ExchangeObject(weights=sent, weight_type=WeightType.WEIGHTS))
            # the round's first epoch starts exactly from the global prompts, whatever the site held
            assert torch.equal(seen[2 * round_], sent["md_prompts.tokens"])
            assert len(seen) == 2 * (round_ + 1)  # local_epochs per round
            returned = algo.get_weights()
            assert returned.weight_type == WeightType.WEIGHT_DIFF
            # only the prompts (and their 512-byte description) travel: 8.7 KB, not SAM's weights
            assert set(returned.weights) == {"md_prompts.tokens", "ie_prompts.tokens", "ptsam_meta"}
            sent_bytes = sum(t.numel() * t.element_size() for t in returned.weights.values())
            assert sent_bytes == 8 * 256 * 4 + 512
            updates.append(returned.weights)
        global_weights = _fedavg(global_weights, updates, WeightType.WEIGHT_DIFF)
        dice.append(_held_out_dice(global_weights, held_out, generalist, tmp_path / "score"))
    print("held-out Dice of the global prompts, rounds 0..3:", ", ".join(f"{d:.3f}" for d in dice))
    assert dice[-1] - dice[0] >= 0.3

    # the site's evaluation scores the weights it is sent, not its own model.pt
    # (its own model.pt would score the same whatever was sent: the first and the last global
    # prompts, which differ by 0.3 or more on the held-out images, must score differently here too)
    initial = quiet(PTSAM, "tiny", str(generalist)).state_dict()
    scores = [
        sites[0].evaluate(ExchangeObject(weights=w, weight_type=WeightType.WEIGHTS)).metrics["val_mean_dice"]
        for w in (initial, global_weights)
    ]
    assert all(0.0 <= d <= 1.0 for d in scores) and abs(scores[1] - scores[0]) > 1e-6

    # a server sending prompts of another network is refused, naming the difference
    other = quiet(PTSAM, "tiny", str(generalist), n_md_prompts=4, num_classes=2).state_dict()  # same numel
    with pytest.raises(IncompatibleCheckpointError, match="n_md_prompts"):
        sites[0].train(ExchangeObject(weights=other, weight_type=WeightType.WEIGHTS))

    # each site's rounds are one MLflow run in its own store, its loss logged in every round
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'site_a' / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ptsam").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name.startswith("site_a_")
    for algo in sites:
        algo.finalize()
