"""The training workflow as users run it: `python -m monai.bundle run training ...`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from helpers import BUNDLE, monai_bundle, quiet, training_until_first_epoch
from scripts.data.datasets import load_datalist
from scripts.demo.synthetic import generate
from scripts.model.network import PTSAM
from scripts.model.prompt_file import decode_meta, load_prompts

TRAIN = "configs/train.yaml"


def _train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config_file", TRAIN, "--sam_variant", "tiny", "--dataset_dir", str(dataset),
        "--output_dir", str(out / "eval"), "--ckpt_dir", str(out / "models"), *extra,
    ]  # fmt: skip


def test_two_epochs_write_a_loadable_model(synthetic, tmp_path):
    done = monai_bundle("run", "training", *_train_args(synthetic / "microscopy", tmp_path, "--epochs", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 2/2" in done.stdout and "val_mean_dice" in done.stdout
    # what the run trains and chooses on, said before it starts (a user's own folder is split by rule)
    assert "training on 4 image(s); 2 validation image(s) choose the best epoch" in done.stdout
    model = tmp_path / "models" / "model.pt"
    state = torch.load(model, weights_only=True)
    assert set(state) == {"md_prompts.tokens", "ie_prompts.tokens", "ptsam_meta", "ptsam_recipe", "ptsam_split"}
    assert decode_meta(state["ptsam_meta"])["sam_variant"] == "tiny"
    net = quiet(PTSAM, "tiny")
    before = net.md_prompts.tokens.detach().clone()
    load_prompts(net, model)
    assert not torch.equal(net.md_prompts.tokens, before)  # trained prompts, not the initial ones
    assert len(list((tmp_path / "eval" / "embedding_cache").glob("*.pt"))) == 6  # 4 training + 2 validation
    resume = torch.load(tmp_path / "models" / "training_state.ckpt", weights_only=True)
    assert resume["epoch"] == 2 and "optimizer" in resume and "lr_scheduler" in resume


def test_without_validation_images_the_final_prompts_are_saved(synthetic, tmp_path):
    """As MONAI Label trains on one or two labelled images: no validation list, still a model.pt."""
    args = _train_args(synthetic / "microscopy", tmp_path, "--epochs", "2", "--validate#dataset#data", "[]")
    done = monai_bundle("run", "training", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no validation ran: the final prompts are saved" in done.stdout + done.stderr
    assert "training on 4 image(s); no validation image: the final prompts will be saved" in done.stdout
    net = quiet(PTSAM, "tiny")
    before = net.md_prompts.tokens.detach().clone()
    load_prompts(net, tmp_path / "models" / "model.pt")
    assert not torch.equal(net.md_prompts.tokens, before)


def test_a_batch_may_mix_volume_slices_and_2d_images(synthetic):
    """MONAI Label's datalist is whatever was labelled: NIfTI volumes beside TIFF fields."""
    case = {"ct": "ct_000.nii.gz", "microscopy": "cells_000.tif"}
    data = [{k: str(synthetic / m / f"{k}sTr" / name) for k in ("image", "label")} for m, name in case.items()]
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / TRAIN))
    parser.update({"bundle_root": str(BUNDLE), "sam_variant": "tiny", "device": "$torch.device('cpu')"})
    parser.update({"train#dataset#data": data, "cache_embeddings": False, "batch_size": 8})
    parser["train#dataloader#shuffle"] = False
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["image"].shape == (5, 3, 256, 256) and batch["label"].shape == (5, 1, 256, 256)  # 4 slices + 1 field


def test_early_stopping_stops_and_stays_stopped(synthetic, tmp_path):
    # lr 0: nothing improves after the first validation, so patience 1 stops at epoch 2
    args = _train_args(synthetic / "microscopy", tmp_path, "--epochs", "30", "--early_stop_patience", "1")
    args += ["--learning_rate", "0"]
    done = monai_bundle("run", "training", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "early stopping: val_mean_dice has not improved" in done.stdout + done.stderr
    assert "epoch 2/30" in done.stdout and "epoch 3/30" not in done.stdout
    state = tmp_path / "models" / "training_state.ckpt"
    assert torch.load(state, weights_only=True)["epoch"] == 2
    again = monai_bundle("run", "training", *args)  # the same command: nothing more to do
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stopped early at epoch 2" in again.stdout + again.stderr and "epoch 3/30" not in again.stdout
    assert torch.load(state, weights_only=True)["epoch"] == 2


def test_plain_run_trains_too_and_reuses_the_cache(synthetic, tmp_path):
    first = monai_bundle("run", "training", *_train_args(synthetic / "microscopy", tmp_path, "--epochs", "1"))
    assert first.returncode == 0, first.stderr[-3000:]
    cache = sorted(p.stat().st_mtime_ns for p in (tmp_path / "eval" / "embedding_cache").glob("*.pt"))
    again = tmp_path / "again"
    again.mkdir()
    cache_dir = str(tmp_path / "eval" / "embedding_cache")
    args = _train_args(synthetic / "microscopy", again, "--epochs", "1", "--cache_dir", cache_dir)
    done = monai_bundle("run", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 1/1" in done.stdout and (again / "models" / "model.pt").is_file()
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "eval" / "embedding_cache").glob("*.pt")) == cache


def test_resume_after_sigkill(synthetic, tmp_path):
    args = _train_args(synthetic / "microscopy", tmp_path, "--epochs", "25", "--early_stop_patience", "0")
    state = tmp_path / "models" / "training_state.ckpt"
    proc = training_until_first_epoch(args, state)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_epochs = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= done_epochs < 25, "training must be killed mid-run for this test"
    resumed = monai_bundle("run", "training", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {state}: epoch {done_epochs} of 25 done" in resumed.stdout
    assert f"epoch {done_epochs + 1}/25" in resumed.stdout and "epoch 1/25 " not in resumed.stdout
    assert "epoch 25/25" in resumed.stdout
    assert torch.load(state, weights_only=True)["epoch"] == 25


def test_bad_dataset_fails_before_training(synthetic, tmp_path):
    done = monai_bundle("run", "training", *_train_args(synthetic / "endoscopy", tmp_path, "--epochs", "1"))
    assert done.returncode != 0
    assert "polyp_000.png: label values 255 are not among the declared classes [1]" in done.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


def _workflow(generalist: Path, dataset: Path, out: Path, **overrides) -> ConfigParser:
    """train.yaml on the `tiny` generalist, parsed in this process."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / TRAIN))
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(dataset),
            "output_dir": str(out / "eval"),
            "ckpt_dir": str(out / "models"),
            "sam_variant": "tiny",
            "sam_checkpoint": str(generalist),
            "device": "$torch.device('cpu')",
            "tracking_enabled": False,
            **overrides,
        }
    )
    return parser


def _held_out_scores(generalist: Path, dataset: Path, out: Path, **overrides) -> dict[str, dict[str, float]]:
    """Metrics on the held-out test images of untrained prompts and of the prompts training
    saved (a separate evaluator: the test images take no part in training or selection)."""
    scorer = _workflow(generalist, dataset, out, **overrides)
    scorer["validate#dataset#data"] = load_datalist(dataset, "test")
    evaluator = scorer.get_parsed_content("validate#evaluator")
    evaluator.run()
    untrained = dict(evaluator.state.metrics)
    parser = _workflow(generalist, dataset, out, **overrides)
    parser.get_parsed_content("initialize")  # determinism and the dataset check
    parser.get_parsed_content("train#trainer").run()
    load_prompts(scorer.get_parsed_content("network"), out / "models" / "model.pt")
    evaluator.run()
    return {"untrained": untrained, "trained": dict(evaluator.state.metrics)}


@pytest.mark.slow
def test_learning_is_real(generalist, tmp_path):
    """The frozen `tiny` generalist with 8 untrained MD tokens scores a Dice near 0 on synthetic
    16-bit microscopy (a domain and a task it never saw); 40 epochs of prompt tuning on 16
    images bring the 4 held-out test images to about 0.9."""
    generate(str(tmp_path / "data"), seed=0, modalities="microscopy")
    scores = _held_out_scores(generalist, tmp_path / "data" / "microscopy", tmp_path)
    untrained, trained = (scores[k]["val_mean_dice"] for k in ("untrained", "trained"))
    print(f"held-out test Dice: untrained prompts {untrained:.3f}, trained {trained:.3f}")
    assert trained >= 0.8 and trained - untrained >= 0.5


@pytest.mark.slow
def test_two_classes_each_learn(generalist, tmp_path):
    """Round cells (label 1) and thin rods (label 2): each class is its own sigmoid with Dice and
    binary cross-entropy, and each gains on the held-out test images."""
    generate(str(tmp_path / "data"), seed=0, modalities="cells_rods")
    two = {"num_classes": 2, "classes": [1, 2], "class_names": ["cell", "rod"]}
    scores = _held_out_scores(generalist, tmp_path / "data" / "cells_rods", tmp_path, **two)
    for name in two["class_names"]:
        before, after = scores["untrained"][f"val_dice_{name}"], scores["trained"][f"val_dice_{name}"]
        print(f"held-out test Dice of {name}: untrained prompts {before:.3f}, trained {after:.3f}")
        assert after - before >= 0.3


def _killed_after_epoch(epoch: int, overrides: dict) -> subprocess.CompletedProcess:
    """train.yaml's training with ``overrides``, its process ended abruptly (``os._exit``, as by a
    SIGKILL) right after epoch ``epoch``'s training state is saved."""
    script = f"""
import json, os, sys
from ignite.engine import Events
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config("{TRAIN}")
parser.update(json.loads(sys.argv[1]))
parser.get_parsed_content("initialize")
trainer = parser.get_parsed_content("train#trainer")
# attached at start, after the training state's save: the state of epoch {epoch} is on disk
trainer.add_event_handler(
    Events.STARTED, lambda t: t.add_event_handler(Events.EPOCH_COMPLETED(once={epoch}), lambda t: os._exit(9))
)
trainer.run()
"""
    command = [sys.executable, "-W", "ignore", "-c", script, json.dumps(overrides)]
    return subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, errors="replace", timeout=600)


def test_training_on_volumes_is_deterministic_and_resumes_exactly(synthetic, tmp_path):
    """Same seed, same data: the same prompts bit for bit, also when the training was killed after
    an epoch and resumed. The slices sampled from each volume come from the random transforms' own
    generators, which the training state saves with torch's."""
    knobs = {"epochs": 3, "intensity": "window", "slices_per_volume": 2, "tracking_enabled": False}
    args = [a for k, v in knobs.items() for a in (f"--{k}", str(v).lower())]
    whole = monai_bundle("run", "training", *_train_args(synthetic / "ct", tmp_path / "a", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "b"
    paths = {"dataset_dir": str(synthetic / "ct"), "output_dir": str(out / "eval"), "ckpt_dir": str(out / "models")}
    killed = _killed_after_epoch(1, {**knobs, **paths, "sam_variant": "tiny"})
    state = out / "models" / "training_state.ckpt"
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert torch.load(state, weights_only=True)["epoch"] == 1
    resumed = monai_bundle("run", "training", *_train_args(synthetic / "ct", out, *args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {state}: epoch 1 of 3 done" in resumed.stdout
    runs = [torch.load(o / "models" / "training_state.ckpt", weights_only=True) for o in (tmp_path / "a", out)]
    assert runs[0]["epoch"] == runs[1]["epoch"] == 3
    assert torch.equal(runs[0]["network"]["md_prompts.tokens"], runs[1]["network"]["md_prompts.tokens"])
    assert torch.equal(runs[0]["random"]["transforms"][0]["keys"], runs[1]["random"]["transforms"][0]["keys"])
