"""MLflow tracking: a local SQLite store by default, a real server on request, one run per invocation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser
from monai.optimizers import WarmupCosineSchedule

from helpers import BUNDLE, REPO, monai_bundle, quiet, training_until_first_epoch
from scripts.data.io import read_image
from scripts.engine.tracking import REGISTRY_FINGERPRINT_TAG, TrackingError, TrackingRun
from scripts.model.prompt_file import IncompatibleCheckpointError

TRAIN = "configs/train.yaml"
EVALUATE = "['configs/train.yaml','configs/evaluate.yaml']"
PARAMS = {
    "sam_variant", "sam_checkpoint", "backbone_fingerprint", "n_md_prompts", "n_ie_prompts", "num_classes",
    "learning_rate", "epochs", "batch_size", "seed", "n_training_images", "scale", "cache_embeddings",
    "random_weights", "intensity", "classes",
}  # fmt: skip


def _args(synthetic: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--sam_variant", "tiny", "--dataset_dir", str(synthetic / "microscopy"),
        "--output_dir", str(out / "eval"), "--ckpt_dir", str(out / "models"), *extra,
    ]  # fmt: skip


def _runs(uri: str, experiment: str = "ptsam"):
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []
    return client, runs


def _store(out: Path) -> str:
    return f"sqlite:///{out / 'eval' / 'mlruns.db'}"


def test_training_is_tracked_in_the_local_store(synthetic, tmp_path):
    done = monai_bundle("run", "training", "--config_file", TRAIN, *_args(synthetic, tmp_path, "--epochs", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(_store(tmp_path))
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("train-")
    assert PARAMS <= set(run.data.params)
    assert run.data.params["n_training_images"] == "4" and run.data.params["sam_variant"] == "tiny"
    assert run.data.params["random_weights"] == "True"  # tiny without a checkpoint: seeded random weights
    # what was used, not the knob's null: on exactly when image-encoder prompts train (none here)
    assert run.data.params["activation_checkpointing"] == "False" and run.data.params["amp_dtype"] == "None"
    assert run.data.tags["bundle_version"] == "0.1.0" and run.data.tags["kind"] == "train"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a clone: the commit is recorded where MLflow's UI shows it
        assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    # 4 training images, batch 4: one iteration per epoch
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2] and len(client.get_metric_history(run.info.run_id, "lr")) == 2
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert [m.step for m in dice] == [1, 2] and all(0 <= m.value <= 1 for m in dice)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "config"} <= artifacts
    config = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert config == {"config/resolved_config.json", "config/command.txt"}
    resolved = client.download_artifacts(run.info.run_id, "config/resolved_config.json", str(tmp_path))
    assert '"sam_variant": "tiny"' in Path(resolved).read_text() and '"epochs": 2' in Path(resolved).read_text()
    # a second invocation, even with the same run name, is a second run
    again = monai_bundle(
        "run", "training", "--config_file", TRAIN,
        *_args(synthetic, tmp_path, "--epochs", "1", "--resume", "false", "--run_name", runs[0].info.run_name),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_runs(_store(tmp_path))[1]) == 2


def _warmup_cosine(t_total: int, steps: int) -> list[float]:
    """train.yaml's schedule (lr 0.05, 4 warm-up steps) at steps 0..steps-1, computed apart."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=4, t_total=t_total, warmup_multiplier=0.1)
    return [0.05 * schedule.lr_lambda(step) for step in range(steps)]


def test_the_logged_learning_rate_is_the_one_each_step_used(synthetic, tmp_path):
    """`lr` at step i is the rate step i trained with (the scheduler moves it on once the step is
    done), and a training resumed with more epochs runs its schedule to the new end."""
    args = ["--config_file", TRAIN, *_args(synthetic, tmp_path, "--batch_size", "1", "--warmup_epochs", "1")]
    first = monai_bundle("run", "training", *args, "--epochs", "1")  # 4 images, batch 1: 4 steps an epoch
    assert first.returncode == 0, first.stderr[-3000:]
    more = monai_bundle("run", "training", *args, "--epochs", "2")
    assert more.returncode == 0, more.stderr[-3000:]
    client, (run,) = _runs(_store(tmp_path))  # the resumed training continues its run
    history = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 9))
    logged = [m.value for m in history]
    assert logged[0] == pytest.approx(0.005)  # the warm-up's first rate, 0.1 x 0.05
    assert logged[:4] == pytest.approx(_warmup_cosine(4, 4))  # epoch 1, planned as the whole training
    assert logged[4:] == pytest.approx(_warmup_cosine(8, 8)[4:])  # epoch 2, on a schedule to its new end
    assert "--epochs 2 (was 1): the learning-rate schedule now ends at epoch 2" in more.stdout
    assert "epoch 1/1  loss " in first.stdout and f"lr {logged[0]:.2e} to {logged[3]:.2e}" in first.stdout
    assert f"lr {logged[4]:.2e} to {logged[7]:.2e}" in more.stdout


def test_evaluation_is_tracked(synthetic, tmp_path):
    trained = monai_bundle("run", "training", "--config_file", TRAIN, *_args(synthetic, tmp_path, "--epochs", "1"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    overlays = ("--n_overlays", "1")
    done = monai_bundle("run", "evaluating", "--config_file", EVALUATE, *_args(synthetic, tmp_path, *overlays))
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(_store(tmp_path))
    evaluation = [r for r in runs if r.data.tags["kind"] == "evaluate"]
    assert len(evaluation) == 1 and evaluation[0].data.params["n_images"] == "2"
    assert evaluation[0].data.tags["eval_split"] == "test"  # which images were scored
    assert 0 <= evaluation[0].data.metrics["val_mean_dice"] <= 1
    artifacts = {a.path for a in client.list_artifacts(evaluation[0].info.run_id)}
    assert {"metrics.csv", "overlays", "model.pt"} <= artifacts


def test_tracking_switched_off(synthetic, tmp_path):
    done = monai_bundle(
        "run", "training", "--config_file", TRAIN,
        *_args(synthetic, tmp_path, "--epochs", "1", "--tracking_enabled", "false"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "eval" / "mlruns.db").exists()


def test_monai_tracking_flag_never_logs_twice(synthetic, tmp_path):
    done = monai_bundle(
        "run", "training", "--config_file", TRAIN, "--tracking", "mlflow",
        *_args(synthetic, tmp_path, "--epochs", "2"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(_store(tmp_path))
    assert len(runs) == 1
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2
    # with the bundle's own tracking off, MONAI's handler records the run by itself
    alone = tmp_path / "alone"
    done = monai_bundle(
        "run", "training", "--config_file", TRAIN, "--tracking", "mlflow",
        *_args(synthetic, alone, "--epochs", "2", "--tracking_enabled", "false"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(_store(alone))  # MONAI's handler uses the bundle's experiment_name
    assert len(runs) == 1 and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_before_training(synthetic, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.time()
    done = monai_bundle("run", "training", "--config_file", TRAIN, *_args(synthetic, tmp_path, "--tracking_uri", uri))
    # Before any epoch: the check waits 5 s; the rest is start-up (importing torch, MONAI and
    # MLflow), slow on a loaded 2-core machine, so the bound is loose.
    assert done.returncode != 0 and time.time() - start < 180 and "epoch 1/" not in done.stdout + done.stderr
    assert f"MLflow tracking server {uri} is unreachable" in done.stderr
    assert not (tmp_path / "models" / "model.pt").exists() and not (tmp_path / "models").exists()


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(uri + "/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the MLflow server did not start within 120 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_training_against_a_real_mlflow_server(synthetic, tmp_path, mlflow_server):
    done = monai_bundle(
        "run", "training", "--config_file", TRAIN,
        *_args(synthetic, tmp_path, "--epochs", "2", "--tracking_uri", mlflow_server),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(mlflow_server)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert PARAMS <= set(runs[0].data.params)
    assert len(client.get_metric_history(runs[0].info.run_id, "val_mean_dice")) == 2
    assert "model.pt" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert not (tmp_path / "eval" / "mlruns.db").exists()  # nothing went to the local store


def test_sigterm_ends_the_run_killed_and_resuming_continues_it(synthetic, tmp_path):
    args = ["--config_file", TRAIN, "--system_metrics_interval", "1"]
    args += _args(synthetic, tmp_path, "--epochs", "25", "--early_stop_patience", "0")
    state = tmp_path / "models" / "training_state.ckpt"
    proc = training_until_first_epoch(args, state)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    done_epochs = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= done_epochs < 25, "training must be stopped mid-run for this test"
    client, runs = _runs(_store(tmp_path))
    assert len(runs) == 1 and runs[0].info.status == "KILLED" and runs[0].data.tags["error"] == "SIGTERM"

    resumed = monai_bundle("run", "training", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, runs = _runs(_store(tmp_path))
    assert len(runs) == 1  # the same run, continued
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert steps == set(range(1, 26))  # one iteration per epoch, before and after the interruption
    assert client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")


def test_an_error_during_training_ends_the_run_failed(synthetic, tmp_path):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / TRAIN))
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(synthetic / "microscopy"),
            "output_dir": str(tmp_path / "eval"),
            "ckpt_dir": str(tmp_path / "models"),
            "sam_variant": "tiny",
            "device": "$torch.device('cpu')",
            "loss": "$lambda prediction, target: 1 / 0",
        }
    )
    with pytest.warns(UserWarning), pytest.raises(ZeroDivisionError):
        parser.get_parsed_content("train#trainer").run()
    _, runs = _runs(_store(tmp_path))
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["error"] == "ZeroDivisionError: division by zero"


def _training(synthetic: Path, out: Path, epochs: int):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / TRAIN))
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(synthetic / "microscopy"),
            "output_dir": str(out / "eval"),
            "ckpt_dir": str(out / "models"),
            "sam_variant": "tiny",
            "device": "$torch.device('cpu')",
            "epochs": epochs,
            "early_stop_patience": 0,
            "system_metrics_interval": 0,
        }
    )
    quiet(parser.get_parsed_content, "initialize")
    return quiet(parser.get_parsed_content, "train#trainer")


@pytest.mark.parametrize("when", ["in_epoch_3", "just_after_epoch_2_is_saved"])
def test_a_resumed_run_holds_each_step_once_the_kept_one(synthetic, tmp_path, when):
    from ignite.engine import Events

    def interrupt(engine):
        raise KeyboardInterrupt

    trainer = _training(synthetic, tmp_path, epochs=4)
    if when == "in_epoch_3":  # after its step's loss is known, before its state is saved
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), interrupt)
    else:  # attached when the run starts, after the state's save is: right after it
        add = trainer.add_event_handler
        trainer.add_event_handler(Events.STARTED, lambda t: add(Events.EPOCH_COMPLETED(once=2), interrupt))
    with pytest.raises(KeyboardInterrupt):
        quiet(trainer.run)
    assert torch.load(tmp_path / "models" / "training_state.ckpt", weights_only=True)["epoch"] == 2
    client, runs = _runs(_store(tmp_path))
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]  # the saved epochs

    quiet(_training(synthetic, tmp_path, epochs=4).run)
    client, runs = _runs(_store(tmp_path))
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for key in ("train_loss", "lr", "val_mean_dice"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3, 4], key  # each epoch once: the kept one
    aside = "interrupted_epoch_metrics.json" in {a.path for a in client.list_artifacts(run_id)}
    assert aside == (when == "in_epoch_3")


def test_the_trained_prompts_are_a_registered_mlflow_model_that_segments(synthetic, tmp_path, tiny_sam_file):
    args = _args(synthetic, tmp_path, "--epochs", "2", "--registered_model_name", "ptsam")
    done = monai_bundle("run", "training", "--config_file", TRAIN, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(_store(tmp_path))
    version = client.get_model_version("ptsam", "1")
    assert version.run_id == runs[0].info.run_id
    fingerprint = client.get_registered_model("ptsam").tags[REGISTRY_FINGERPRINT_TAG]
    assert fingerprint == runs[0].data.params["backbone_fingerprint"]
    image = str(synthetic / "microscopy" / "imagesTr" / "cells_000.tif")
    inferred = monai_bundle(
        "run", "inference", "--config_file", "configs/inference.yaml", "--sam_variant", "tiny",
        "--dataset_dir", image, "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "pred"),
    )  # fmt: skip
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    expected, _ = read_image(tmp_path / "pred" / "cells_000_seg.tif")

    mlflow.set_tracking_uri(_store(tmp_path))
    try:
        # the SAM weights it was trained on (here tiny's seeded random ones) are given at load time
        model = mlflow.pyfunc.load_model("models:/ptsam/1", model_config={"sam_checkpoint": None})
        (label,) = quiet(model.predict, [image])
        assert np.array_equal(label, np.asarray(expected[0]))  # what the inference workflow writes
        other = mlflow.pyfunc.load_model("models:/ptsam/1", model_config={"sam_checkpoint": str(tiny_sam_file)})
        with pytest.raises(IncompatibleCheckpointError, match="backbone_fingerprint"):
            quiet(other.predict, [image])
    finally:
        mlflow.set_tracking_uri(None)


def test_a_registered_name_of_another_model_is_refused_before_any_work(tmp_path):
    (tmp_path / "eval").mkdir()
    uri = _store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("theirs")  # another team's model
    client.create_registered_model("ptsam_b")
    client.set_registered_model_tag("ptsam_b", REGISTRY_FINGERPRINT_TAG, "backbone-b")
    run = TrackingRun(tracking_uri=uri, output_dir=tmp_path, params={"backbone_fingerprint": "backbone-a"})
    run.check_registered_name("new_name")  # free
    run.check_registered_name(None)
    with pytest.raises(TrackingError, match="registered_model_name=theirs: .* is not a PTSAM model"):
        run.check_registered_name("theirs")
    with pytest.raises(TrackingError, match="another SAM backbone \\(fingerprint backbone-b, this run backbone-a\\)"):
        run.check_registered_name("ptsam_b")
    client.set_registered_model_tag("ptsam_b", REGISTRY_FINGERPRINT_TAG, "backbone-a")
    run.check_registered_name("ptsam_b")  # the same backbone: a new version is fine


@pytest.mark.parametrize("user_uri", [None, "sqlite:///{tmp}/theirs.db"])
def test_logging_a_model_leaves_later_runs_their_own_store(tmp_path, monkeypatch, user_uri):
    from scripts.model.network import PTSAM
    from scripts.model.prompt_file import save_prompts

    monkeypatch.chdir(tmp_path)  # MLflow's own default store would be ./mlflow.db
    if user_uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", user_uri.format(tmp=tmp_path))
    model = save_prompts(quiet(PTSAM, "tiny", n_md_prompts=2), tmp_path / "model.pt")
    first = TrackingRun(tracking_uri=_store(tmp_path / "first"), output_dir=tmp_path / "first")
    (tmp_path / "first" / "eval").mkdir(parents=True)
    first.start()
    quiet(first.log_model, model)
    first.finish()
    assert os.environ.get("MLFLOW_TRACKING_URI") == (user_uri and user_uri.format(tmp=tmp_path))
    later = TrackingRun(output_dir=tmp_path / "later")  # the next training of the same process
    expected = user_uri.format(tmp=tmp_path) if user_uri else f"sqlite:///{(tmp_path / 'later').resolve()}/mlruns.db"
    assert later.uri == expected
    assert not (tmp_path / "mlflow.db").exists()
