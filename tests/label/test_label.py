"""The bundle as a live model in the real MONAI Label 0.8.5 server (loopback only).

The server runs from its own environment (`make label-setup`, about 90 s the first time), with
`label/start.py` as `make label` starts it (with one more allowed browser origin, as
`make label CORS_ORIGINS=...` gives it), on a copy of the bundle without `model.pt`, as a new user
starts: the first test trains it through `/train` (the `trained` fixture does where that test is
not run), on the `tiny` generalist."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from helpers import BUNDLE, REPO, monai_bundle
from scripts.data.io.geojson import rasterise
from scripts.demo.synthetic import write_dicom_series
from scripts.model.prompt_file import RECIPE_KEY, encode_json, read_recipe

pytestmark = pytest.mark.slow

LABEL_PY = REPO / ".venv-label" / "bin" / "python"
VIEWER = "http://viewer.example:8080"  # an origin allowed by CORS_ORIGINS, besides the local ones
BOUNDARY = b"ptsam-form-8c1f0e"  # between the parts of multipart bodies (in none of the files sent)
NOT_SERVED = "no image '{}' in the datastore (GET /datastore/?output=all lists its ids)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one HTTP request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _text(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")  # progress bars; the locale may be ASCII


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def label_env() -> Path:
    done = subprocess.run(
        ["make", "-s", "label-setup"],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return LABEL_PY


def _start_server(label_env: Path, generalist: Path, bundle: Path, studies: Path, log: Path, env: dict):
    """`make label`'s start script on a free port, once it answers: (base URL, log, process)."""
    port = _free_port()
    env = {**os.environ, "SAM_CHECKPOINT": str(generalist), "SAM_VARIANT": "tiny", "PYTHONPATH": "", **env}
    command = [str(label_env), str(REPO / "label" / "start.py"), "--studies", str(studies)]
    command += ["--port", str(port), "--bundle", str(bundle)]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, f"the server exited: {_text(log)[-3000:]}"
        assert time.time() < deadline, f"the server did not answer: {_text(log)[-3000:]}"
        try:
            if _request(f"{base}/info/")[0] == 200:
                return base, log, proc
        except OSError:
            time.sleep(0.5)


def _bundle_copy(target: Path) -> Path:
    skip = shutil.ignore_patterns("eval", "predictions", "*.pt", "*.ckpt", "__pycache__")
    shutil.copytree(BUNDLE, target, ignore=skip)
    return target


@pytest.fixture(scope="module")
def server(label_env, generalist, tmp_path_factory):
    """A running server on a bundle without model.pt: (base URL, bundle copy, studies folder, work
    folder, log, process)."""
    from scripts.demo.synthetic import generate

    root = tmp_path_factory.mktemp("label")
    bundle = _bundle_copy(root / "ptsam")

    data = root / "synthetic"
    generate(str(data), seed=1, n_train=3, n_val=0, n_test=0, modalities="microscopy,ct")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(data / "ct" / "imagesTr" / "ct_000.nii.gz", studies)
    shutil.copy(data / "ct" / "labelsTr" / "ct_000.nii.gz", studies / "labels" / "final")
    for i in range(3):  # with the volume, four labelled images: MONAI Label gives 3 to train, 1 to validate
        shutil.copy(data / "microscopy" / "imagesTr" / f"cells_{i:03d}.tif", studies)
        shutil.copy(data / "microscopy" / "labelsTr" / f"cells_{i:03d}.tif", studies / "labels" / "final")
    ct = nib.load(data / "ct" / "imagesTr" / "ct_000.nii.gz")
    # A series folder in the studies, image `ct_000_dicom` (a DICOMweb datastore's is its cache's folder).
    write_dicom_series(np.asarray(ct.dataobj), ct.affine, studies / "ct_000_dicom", seed=0)
    (studies / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    field = (data / "microscopy" / "imagesTr" / "cells_001.tif").read_bytes()
    (studies / "truncated.tif").write_bytes(field[: len(field) // 2])  # its header reads, its pixels do not
    (studies / "notes.xml").write_text("not an image")  # MONAI Label lists *.xml (pathology) as images
    shutil.copy(data / "microscopy" / "imagesTr" / "cells_002.tif", root / "outside.tif")  # not in the datastore
    (root / "notes.txt").write_text("not an image")

    env = {"CORS_ORIGINS": VIEWER, "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    base, log, proc = _start_server(label_env, generalist, bundle, studies, root / "server.log", env)
    yield base, bundle, studies, root, log, proc
    if proc.poll() is None:  # stopped as Ctrl-C stops it, so that it removes its temporary folder
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _form(fields: dict[str, bytes], files: dict[str, Path]) -> tuple[bytes, dict]:
    """A multipart/form-data body (fields, and files under their names) and its header."""
    parts = [(f'name="{name}"', value) for name, value in fields.items()]
    parts += [(f'name="{name}"; filename="{path.name}"', path.read_bytes()) for name, path in files.items()]
    body = b"".join(
        b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; " + d.encode() + b"\r\n\r\n" + v + b"\r\n"
        for d, v in parts
    )
    return body + b"--" + BOUNDARY + b"--\r\n", {"Content-Type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}


def _infer(
    base: str, image: str, params: dict | None = None, model: str = "ptsam", upload: Path | None = None, **args: str
) -> tuple[int, bytes, dict]:
    """POST /infer/<model>: (status, body, headers); ``args`` are more query arguments."""
    query = urllib.parse.urlencode({"image": image, "output": "image", **args})
    body, headers = None, {}
    if params or upload:  # MONAI Label takes per-request options as a `params` form field holding JSON
        body, headers = _form({"params": json.dumps(params or {}).encode()}, {"file": upload} if upload else {})
    status, headers, body = _request(f"{base}/infer/{model}?{query}", "POST", body, headers)
    return status, body, headers


def _infer_file(base: str, image: str, tmp_path: Path, suffix: str) -> Path:
    status, body, _ = _infer(base, image)
    assert status == 200, body[-2000:]
    out = tmp_path / f"{Path(image).name}{suffix}"
    out.write_bytes(body)
    return out


TRAINED_EPOCHS = 40  # 3 images: one step an epoch


def _train(base: str, log: Path, max_epochs: int = 1, expected: str = "DONE", **options: Any) -> dict:
    """POST /train/ptsam (with more ``options``) and wait until it is done (or has failed, where
    that is ``expected``): the outcome it reports, where it is done."""
    request = json.dumps({"max_epochs": max_epochs, **options}).encode()
    status, _, body = _request(f"{base}/train/ptsam", "POST", request, {"Content-Type": "application/json"})
    assert status == 200, body
    deadline = time.time() + 300
    while (state := json.loads(_request(f"{base}/train/")[2])).get("status") in ("SUBMITTED", "RUNNING"):
        assert time.time() < deadline, "training did not finish"
        time.sleep(0.5)
    assert state.get("status") == expected, (state, _text(log)[-3000:])
    if expected != "DONE":
        return {}
    # The task's result, in the last lines GET /train/ shows (MONAI Label logs it as `Result: {...}`),
    # and /info's train_stats: which model.pt is served now, and the Dice values that decided it.
    results = [line.split("Result: ", 1)[1] for line in state["details"] if "Result: " in line]
    assert results, state["details"]
    outcome = json.loads(results[-1])
    assert json.loads(_request(f"{base}/info/")[2])["train_stats"]["ptsam"] == outcome
    return outcome


@pytest.fixture(scope="module")
def trained(server):
    """The server once a /train has written model.pt (the first test does it where it runs)."""
    base, *_, log, _ = server
    if "ptsam" not in json.loads(_request(f"{base}/info/")[2])["models"]:
        _train(base, log)
    return server


def test_a_fresh_bundle_is_listed_once_trained(server):
    """As a new user starts: nothing trained. Inference says so; /info, which 3D Slicer reads,
    lists the model as soon as the first /train has written model.pt, without a restart."""
    base, bundle, *_, log, _ = server
    info = json.loads(_request(f"{base}/info/")[2])
    assert "ptsam" not in info["models"] and "ptsam" in info["trainers"]
    status, body, _ = _infer(base, "cells_000")
    assert status == 409 and "no trained prompts yet" in json.loads(body)["detail"]
    status, body, _ = _infer(base, "cells_000", model="nosuchmodel")
    assert (
        status == 404
        and json.loads(body)["detail"] == "no model 'nosuchmodel'; the models here: none until 'ptsam' is trained"
    )

    _train(base, log)
    assert (bundle / "models" / "model.pt").is_file()
    info = json.loads(_request(f"{base}/info/")[2])  # asked before any /infer
    assert info["models"]["ptsam"]["type"] == "segmentation"
    assert _infer(base, "cells_000")[0] == 200


def test_info_lists_the_model_and_its_labels(trained):
    base = trained[0]
    status, _, body = _request(f"{base}/info/")
    info = json.loads(body)
    model = info["models"]["ptsam"]
    assert status == 200 and model["type"] == "segmentation"
    assert model["labels"] == {"foreground": 1}  # metadata.json's channel_def, background left out
    assert model["config"]["instance_labels"] is False  # inference.yaml's displayable_configs
    assert "ptsam" in info["trainers"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = (a > 0).sum() + (b > 0).sum()
    return 1.0 if total == 0 else 2 * np.logical_and(a > 0, b > 0).sum() / total


def _local_prediction(generalist: Path, bundle: Path, image: Path, out: Path) -> np.ndarray:
    """The bundle's own CLI inference of one image with the bundle's current model.pt."""
    done = monai_bundle(
        "run", "inference", "--config_file", "configs/inference.yaml", "--sam_variant", "tiny",
        "--sam_checkpoint", str(generalist), "--ckpt_dir", str(bundle / "models"),
        "--dataset_dir", str(image), "--output_dir", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return tifffile.imread(out / f"{image.stem}_seg.tif")


def _runs(bundle: Path) -> list:
    """The bundle's MLflow runs, newest first."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{bundle / 'eval' / 'mlruns.db'}")
    return client.search_runs(
        [client.get_experiment_by_name("ptsam").experiment_id], order_by=["attributes.start_time DESC"]
    )


def _assert_tracked(bundle: Path, outcome: dict) -> None:
    """The train's outcome is in its MLflow run: Dice values as metrics, the decision as tags."""
    run = _runs(bundle)[0]  # the newest: this train's
    for key in ("served", "new"):
        if outcome[f"{key}_dice"] is None:
            assert f"publish_dice_{key}" not in run.data.metrics
        else:
            assert run.data.metrics[f"publish_dice_{key}"] == pytest.approx(outcome[f"{key}_dice"], abs=1e-6)
    unbiased = str(outcome["comparison"]["unbiased"]).lower() if outcome["comparison"] else "none"
    assert {key: run.data.tags.get(f"publish_{key}") for key in ("rule", "kept", "unbiased")} == {
        "rule": outcome["publish"],
        "kept": outcome["kept"],
        "unbiased": unbiased,
    }
    assert outcome["mlflow_run"] == run.info.run_id and run.info.status == "FINISHED", outcome


def test_infer_train_infer(trained, generalist, tmp_path):
    """What briefly trained prompts predict depends on the machine's rounding: the server's answers
    are compared with the bundle's own inference of the same model.pt, not with a number."""
    base, bundle, studies, root, log, _ = trained
    earlier_runs = len(_runs(bundle))
    tiff = tifffile.imread(studies / "cells_000.tif")
    before = tifffile.imread(_infer_file(base, "cells_000", tmp_path, "_before.tif"))
    assert before.shape == tiff.shape and set(np.unique(before)) <= {0, 1}

    volume = nib.load(studies / "ct_000.nii.gz")
    label = nib.load(_infer_file(base, "ct_000", tmp_path, ".nii.gz"))
    assert label.shape == volume.shape  # slice by slice, in the volume's own geometry
    assert np.allclose(label.affine, volume.affine, atol=1e-5)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
    # A DICOM series by its id, the name of its folder in the studies (MONAI Label hands the app
    # the folder, as from a DICOMweb store): a NIfTI label in the series' geometry.
    assert "ct_000_dicom" in json.loads(_request(f"{base}/datastore/?output=all")[2])["objects"]
    series = nib.load(_infer_file(base, "ct_000_dicom", tmp_path, ".nii.gz"))
    assert series.shape == volume.shape and np.allclose(series.affine, volume.affine, atol=1e-4)

    model = bundle / "models" / "model.pt"
    old = _sha(model)
    outcome = _train(base, log, max_epochs=TRAINED_EPOCHS)
    assert _sha(model) != old, f"model.pt unchanged: {_text(log)[-3000:]}"
    # Published because the new prompts score at least as well as the served ones, on the same image.
    assert outcome["published"] and outcome["kept"] == "new" and outcome["validation_images"] == 1, outcome
    assert outcome["new_dice"] > outcome["served_dice"], outcome
    assert f"published the new prompts as {model}: validation mean Dice on 1 image(s)" in _text(log)
    # Every labelled image trained or chose the served prompts, and the one validation image chose
    # the new ones: the comparison says it is biased, and why no image could be held out.
    comparison = outcome["comparison"]
    assert len(comparison["images"]) == 1 and comparison["unbiased"] is False, outcome
    assert (
        "biased toward the new prompts (no image could be held out: each validation image trained"
        in (comparison["basis"])
    )
    assert "1 of them trained or chose the served prompts" in comparison["basis"]
    assert (
        "only validation images labelled since the served prompts were trained can be held out" in (comparison["basis"])
    )

    after = tifffile.imread(_infer_file(base, "cells_000", tmp_path, "_after.tif"))
    assert after.shape == tiff.shape and set(np.unique(after)) <= {0, 1} and after.any()  # trained: cells found
    local = _local_prediction(generalist, bundle, studies / "cells_000.tif", tmp_path / "local")
    truth = tifffile.imread(studies / "labels" / "final" / "cells_000.tif")
    print(f"Dice with the label: before training {_dice(before, truth):.3f}, after {_dice(after, truth):.3f}")
    assert _dice(after, local) >= 0.99, "the server's answer is not the new model.pt's"
    assert _dice(before, local) < 0.99, "training did not change the prediction"

    status, body, _ = _infer(base, "cells_000", {"instance_labels": True})  # an option of this request only
    assert status == 200, body[-2000:]
    (tmp_path / "instances.tif").write_bytes(body)
    instances = tifffile.imread(tmp_path / "instances.tif")
    assert np.array_equal(instances > 0, after > 0)  # the same pixels, each object numbered
    assert instances.max() == ndimage.label(after)[1] and set(np.unique(instances)) == set(range(instances.max() + 1))
    again = tifffile.imread(_infer_file(base, "cells_000", tmp_path, "_again.tif"))
    assert np.array_equal(again, after)  # options last one request

    # QuPath-ready polygons of the same objects: a GeoJSON FeatureCollection instead of the label
    status, body, _ = _infer(base, "cells_000", {"geojson": True})
    assert status == 200, body[-2000:]
    collection = json.loads(body)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == ndimage.label(after)[1]
    assert {f["properties"]["classification"]["name"] for f in collection["features"]} == {"foreground"}
    drawn = rasterise(collection, after.shape) > 0
    assert np.logical_and(drawn, after > 0).sum() / np.logical_or(drawn, after > 0).sum() >= 0.95

    # The run is in the bundle's MLflow store, with MONAI Label's datalist (3 train, 1 validation).
    runs = _runs(bundle)
    assert len(runs) == earlier_runs + 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["epochs"] == str(TRAINED_EPOCHS) and "val_mean_dice" in runs[0].data.metrics
    assert runs[0].data.params["n_training_images"] == "3"

    # A train that cannot do better (untrained prompts, one epoch) leaves the served model.pt as it
    # is, and says so with both scores; so does one with no validation image to compare them on.
    trained_sha = _sha(model)
    outcome = _train(base, log, pretrained=False)
    assert _sha(model) == trained_sha, outcome
    assert not outcome["published"] and outcome["kept"] == "served", outcome
    assert outcome["served_dice"] > outcome["new_dice"] and outcome["served_dice"] >= 0.5, outcome
    assert f"kept the served {model}: validation mean Dice on 1 image(s)" in _text(log)
    _assert_tracked(bundle, outcome)
    outcome = _train(base, log, val_split=0)
    assert _sha(model) == trained_sha and outcome["kept"] == "served" and outcome["validation_images"] == 0
    assert outcome["served_dice"] is None and "no validation images" in outcome["reason"]
    _assert_tracked(bundle, outcome)
    assert _dice(tifffile.imread(_infer_file(base, "cells_000", tmp_path, "_kept.tif")), after) == 1.0

    # A second /train is a new run from the new model.pt, not a resumed (finished) first run,
    # and it keeps the recipe recorded in model.pt (here a CT window of -100 HU, not the default).
    # publish: always, the knob that replaces model.pt whatever the scores.
    state = torch.load(model, weights_only=True)
    recipe = {**read_recipe(model), "a_min": -100.0}
    state[RECIPE_KEY] = encode_json(recipe)
    torch.save(state, model)
    trained_sha = _sha(model)
    outcome = _train(base, log, publish="always")
    assert _sha(model) != trained_sha and "resumed from" not in _text(log)
    assert outcome["published"] and outcome["publish"] == "always" and outcome["new_dice"] is not None
    assert (
        outcome["comparison"]["unbiased"] is False
        and "publish: always holds none out" in (outcome["comparison"]["basis"])
    )
    runs = _runs(bundle)
    assert len(runs) == earlier_runs + 4 and runs[0].data.params["a_min"] == "-100.0"
    assert read_recipe(model)["a_min"] == -100.0


# /train's split, run by the task the server builds, on MONAI Label's datastore of ``studies``:
# for each request, the images it trains and validates on, and the split_group the run is given.
_SPLIT_SCRIPT = """
import json, sys
sys.path.insert(0, "label/app")
import main
from monailabel.config import settings

bundle, studies, requests = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
store = main.StudiesDatastore(bundle, studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
task = main.PTSAMTrainTask(bundle, {}, {})
answers = {"options": task.config().get("split_group")}
for name, request in requests.items():
    try:
        training, validation = task._partition_datalist(store.datalist(), request)
    except ValueError as err:
        answers[name] = str(err)
        continue
    overrides = {}
    task._update_overrides(overrides)
    answers[name] = [[d["image"] for d in training], [d["image"] for d in validation], overrides.get("split_group")]
print(json.dumps(answers))
"""


def test_train_keeps_a_patient_in_training_or_validation(label_env, tmp_path):
    """MONAI Label cuts the datastore's ordered list at val_split, through a patient's images (here
    the last slice of pat02, and the second of pat03's two DICOM series): validation, which chooses
    the epoch and decides whether new prompts replace model.pt, scored patients it trained on. The
    split is the bundle's: whole patients by PatientID, and by the train option split_group."""
    bundle = _bundle_copy(tmp_path / "ptsam")
    studies, labels = tmp_path / "studies", tmp_path / "studies" / "labels" / "final"
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    patients = {f"pat01_s{k}": "pat01" for k in range(3)} | {f"pat02_s{k}": "pat02" for k in range(2)}
    for name in patients:
        tifffile.imwrite(studies / f"{name}.tif", rng.integers(0, 255, (32, 40), dtype=np.uint8))
        tifffile.imwrite(labels / f"{name}.tif", (rng.random((32, 40)) > 0.5).astype(np.uint8))
    for name, patient in (("pat03_ax", "P3"), ("pat03_cor", "P3"), ("pat04_ax", "P4")):
        volume = rng.integers(-100, 100, (24, 20, 3)).astype(np.int16)
        write_dicom_series(volume, np.eye(4), studies / name, seed=len(patients), patient_id=patient)
        nib.save(nib.Nifti1Image((volume > 0).astype(np.uint8), np.eye(4)), str(labels / f"{name}.nii.gz"))
        patients[name] = name[:5]
    requests = {
        "by_patient_id": {"val_split": 0.25},
        "by_split_group": {"val_split": 0.5, "split_group": r"^(pat\d+)_"},
        "bundle_default": {"val_split": -1, "split_group": ""},  # 3D Slicer's empty text field
        "bad_pattern": {"split_group": "(pat"},
        "unmatched": {"split_group": r"^(pat0[12])_"},
    }
    done = subprocess.run(
        [str(label_env), "-c", _SPLIT_SCRIPT, str(bundle), str(studies), json.dumps(requests)],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])

    def sides(name: str) -> list[set[str]]:
        return [{patients[Path(image).name.split(".")[0]] for image in part} for part in answers[name][:2]]

    for name, tied, held in (
        ("by_patient_id", {"pat03"}, 2),  # no split_group: slices are cases of their own
        ("by_split_group", {"pat01", "pat02", "pat03", "pat04"}, 4),
        ("bundle_default", {"pat03"}, 2),  # train.yaml's val_fraction 0.2 of 8
    ):
        training, validation = sides(name)
        assert len(answers[name][0]) + len(answers[name][1]) == 8 and len(answers[name][1]) == held, answers[name]
        assert not training & validation & tied, (name, answers[name])
        assert answers[name][2] == (requests[name].get("split_group") or None)  # recorded in the new model.pt
    assert answers["options"] == ""  # a train option (3D Slicer's panel), train.yaml's null by default
    assert answers["bad_pattern"].startswith("split_group '(pat': not a regular expression")
    assert "pat03_ax: split_group '^(pat0[12])_' names no group in its name 'pat03_ax'" in answers["unmatched"]


def test_the_comparison_holds_out_images_labelled_since_the_served_prompts(trained, tmp_path):
    """Images labelled since the served prompts were trained: one of the three validation images
    is held out of the run (the other two choose its best epoch), and the served and the new
    prompts are compared on it, which neither trained on or chose: an unbiased comparison."""
    from scripts.demo.synthetic import generate

    base, bundle, studies, _, log, _ = trained
    generate(str(tmp_path / "more"), seed=5, n_train=2, n_val=0, n_test=0, modalities="microscopy")
    added = [studies / f"later_{i}.tif" for i in range(2)]
    try:
        for i, image in enumerate(added):  # the datastore lists them after the others: validation images
            shutil.copy(
                tmp_path / "more" / "microscopy" / "labelsTr" / f"cells_{i:03d}.tif",
                studies / "labels" / "final" / image.name,
            )
            shutil.copy(tmp_path / "more" / "microscopy" / "imagesTr" / f"cells_{i:03d}.tif", image)
        outcome = _train(base, log, val_split=0.5)  # six labelled images: three train, three validate
    finally:
        for image in added:
            image.unlink(missing_ok=True)
            (studies / "labels" / "final" / image.name).unlink(missing_ok=True)
    assert outcome["validation_images"] == 3, outcome
    held = outcome["comparison"]["images"]  # the first of them the datastore lists (in the folder's order)
    assert held in (["later_0.tif"], ["later_1.tif"]) and outcome["comparison"]["unbiased"] is True, outcome
    assert "neither set of prompts trained on or chose" in outcome["reason"]
    assert "validation mean Dice on 1 image(s)" in outcome["reason"] and outcome["served_dice"] is not None
    text = _text(log)
    assert "1 of the 3 validation image(s) are held out of this run" in text
    assert "training on 3 image(s); 2 validation image(s) choose the best epoch" in text
    _assert_tracked(bundle, outcome)


def test_bad_input_gets_a_message_and_the_server_keeps_serving(trained):
    base = trained[0]
    status, body, _ = _infer(base, "no_such_image")
    assert status == 404 and json.loads(body)["detail"] == NOT_SERVED.format("no_such_image")

    status, body, _ = _infer(base, "cells_000", model="nosuchmodel")
    assert status == 404 and json.loads(body)["detail"] == "no model 'nosuchmodel'; the models here: ptsam"

    status, body, _ = _infer(base, "notes")  # listed by the datastore, no image format
    detail = json.loads(body)["detail"]
    assert status == 415 and "notes.xml: not a supported image file" in detail

    status, body, _ = _infer(base, "broken")  # listed by the datastore, unreadable
    detail = json.loads(body)["detail"]
    assert status == 422 and "broken.png" in detail

    status, body, _ = _infer(base, "truncated")  # found out while reading, not up front
    detail = json.loads(body)["detail"]
    assert status == 422 and "truncated.tif: unreadable TIFF file" in detail

    assert _request(f"{base}/info/")[0] == 200
    assert _infer(base, "cells_001")[0] == 200


def test_only_the_datastore_is_served(trained, tmp_path):
    """An image is a datastore id, or what the server was sent; any other name or path gets one
    answer, whether or not a file is there (MONAI Label would read any image file on the machine)."""
    base, _, studies, root, _, _ = trained
    outside = root / "outside.tif"
    status, _, body = _request(f"{base}/session/", "PUT", *_form({}, {"files": outside}))
    assert status == 200, body
    session = json.loads(body)["session_id"]

    names = [str(outside), "/etc/shadow", "/nonexistent/x.png", str(root / "notes.txt"), str(studies / "cells_000.tif")]
    names += ["labels/final/cells_000", "../studies/cells_000", ".."]
    for image in names:  # asked for, or put in the request by its params, even with a real session's name
        for query, params in (
            (image, None),
            ("cells_000", {"image": image}),
            ("cells_000", {"image": image, "session": {"name": session}}),
        ):
            status, body, _ = _infer(base, query, params)
            assert (status, json.loads(body)) == (404, {"detail": NOT_SERVED.format(image)}), (query, params)

    status, body, _ = _infer(base, "cells_000", {"model_filename": "/etc/shadow"})  # MONAI Label would load it
    assert (status, json.loads(body)) == (
        404,
        {"detail": "no model file '/etc/shadow'; the model files here: model.pt"},
    )

    # What the server was sent is served: an upload with the request, or a session's image.
    tiff = tifffile.imread(outside)
    for name, (status, body, _) in (
        ("upload", _infer(base, "", upload=outside)),
        ("session", _infer(base, "", session_id=session)),
    ):
        assert status == 200, body[-2000:]
        (tmp_path / f"{name}.tif").write_bytes(body)
        assert tifffile.imread(tmp_path / f"{name}.tif").shape == tiff.shape


def test_a_dicom_series_is_handed_out_as_a_volume_file(server, tmp_path):
    """3D Slicer loads Next Sample's `path`, or downloads `/datastore/image`, as a volume file and
    cannot load a folder: a series is handed out as a NIfTI file of it, in the series' geometry."""
    base, _, studies, *_ = server
    status, _, body = _request(f"{base}/datastore/image?image=ct_000_dicom")
    assert status == 200, body[-2000:]
    (tmp_path / "series.nii.gz").write_bytes(body)
    series, volume = nib.load(tmp_path / "series.nii.gz"), nib.load(studies / "ct_000.nii.gz")
    assert series.shape == volume.shape and np.allclose(series.affine, volume.affine, atol=1e-4)
    assert np.array_equal(np.asarray(series.dataobj), np.asarray(volume.dataobj))  # the HU written
    info = json.loads(_request(f"{base}/datastore/image/info?image=ct_000_dicom")[2])
    assert info["path"].endswith("/ct_000_dicom.nii.gz") and os.path.isfile(info["path"])
    assert info["name"] == "ct_000_dicom.nii.gz"  # Next Sample's answer carries it: Slicer's download name
    # One draw (MONAI Label's random strategy fails on a second one within the same second).
    body, headers = json.dumps({}).encode(), {"Content-Type": "application/json"}
    status, _, answer = _request(f"{base}/activelearning/random", "POST", body, headers)
    sample = json.loads(answer)
    assert status == 200 and os.path.isfile(sample["path"]), sample
    assert sample["name"] == os.path.basename(sample["path"])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_cpu_engine_serves_pytorchs_labels(trained, label_env, generalist, tmp_path):
    """`make label ENCODER_ENGINE=onnxruntime`: a second server on the same trained bundle answers
    with the labels the first (PyTorch) one sends, for an image and a volume."""
    base, bundle, studies, *_ = trained
    images = {"cells_000": ".tif", "ct_000": ".nii.gz"}
    reference = {name: _infer_file(base, name, tmp_path, f"_torch{suffix}") for name, suffix in images.items()}
    cache = tmp_path / "cache"  # where the encoder's export goes: its presence shows the engine ran
    env = {"ENCODER_ENGINE": "onnxruntime", "PTSAM_CACHE_DIR": str(cache)}
    env["MONAI_LABEL_SESSION_PATH"] = str(tmp_path / "sessions")
    ort, log, proc = _start_server(label_env, generalist, bundle, studies, tmp_path / "ort.log", env)
    try:
        answers = {name: _infer_file(ort, name, tmp_path, f"_ort{suffix}") for name, suffix in images.items()}
    finally:
        _stop(proc)
    assert "--conf encoder_engine onnxruntime" in _text(log)
    assert list(cache.glob("encoders/*/*.onnx")), f"no ONNX export in {cache}: {_text(log)[-2000:]}"
    read = {".tif": tifffile.imread, ".nii.gz": lambda path: np.asarray(nib.load(path).dataobj)}
    for name, suffix in images.items():
        ours, theirs = read[suffix](answers[name]), read[suffix](reference[name])
        assert ours.shape == theirs.shape and _dice(ours, theirs) >= 0.999, name
    assert read[".tif"](reference["cells_000"]).any()  # the agreement is on cells found, not on two empty masks


def _prompt_file(
    generalist: Path,
    path: Path,
    names: list[str],
    classes: list[int] | None = None,
    label_map: dict | None = None,
    image_kind: str | None = None,
) -> None:
    """An untrained model.pt of ``len(names)`` classes, with its recipe, as training writes it
    (with ``image_kind``, the kind of images it says trained the prompts; none: an older file)."""
    from scripts.engine.recipe import LEGACY, from_knobs
    from scripts.model import PTSAM
    from scripts.model.prompt_file import save_prompts

    net = PTSAM(sam_variant="tiny", sam_checkpoint=str(generalist), num_classes=len(names))
    classes = classes or list(range(1, len(names) + 1))
    recipe = {**LEGACY, "layout": "display", "classes": classes, "label_map": label_map or {}, "class_names": names}
    recipe = from_knobs(**recipe, image_size=256)
    save_prompts(net, path, recipe=recipe if image_kind is None else {**recipe, "image_kind": image_kind})


def _served_labels(base: str) -> dict:
    return json.loads(_request(f"{base}/info/")[2])["models"].get("ptsam", {}).get("labels")


def test_the_server_serves_model_pt_as_trained(label_env, generalist, tmp_path):
    """A model.pt of two classes (trained with the bundle's CLI): /info names its classes with the
    values its labels hold, and it is served and trained on; a model.pt of other classes put in its
    place is served with those; a removed one is no longer served (MONAI Label would go on with
    the untrained prompts)."""
    from scripts.demo.synthetic import generate

    bundle = _bundle_copy(tmp_path / "ptsam")
    model = bundle / "models" / "model.pt"
    _prompt_file(generalist, model, ["nucleus", "membrane"])
    generate(str(tmp_path / "synthetic"), seed=1, n_train=3, n_val=0, n_test=0, modalities="microscopy")
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in range(3):  # every other cell of the second class
        name = f"cells_{i:03d}.tif"
        shutil.copy(tmp_path / "synthetic" / "microscopy" / "imagesTr" / name, studies)
        cells, _ = ndimage.label(tifffile.imread(tmp_path / "synthetic" / "microscopy" / "labelsTr" / name) > 0)
        tifffile.imwrite(studies / "labels" / "final" / name, np.where(cells > 0, 1 + cells % 2, 0).astype(np.uint8))

    env = {"MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
    base, log, proc = _start_server(label_env, generalist, bundle, studies, tmp_path / "server.log", env)
    try:
        assert _served_labels(base) == {"nucleus": 1, "membrane": 2}
        status, body, _ = _infer(base, "cells_000")
        assert status == 200, body[-2000:]
        (tmp_path / "two.tif").write_bytes(body)
        two = tifffile.imread(tmp_path / "two.tif")
        assert two.shape == tifffile.imread(studies / "cells_000.tif").shape and set(np.unique(two)) <= {0, 1, 2}
        # The names 3D Slicer gives the values: the classes, or with instance_labels the objects.
        status, body, _ = _infer(base, "cells_000", output="json")
        assert status == 200 and json.loads(body)["label_names"] == {"nucleus": 1, "membrane": 2}
        status, body, _ = _infer(base, "cells_000", {"instance_labels": True})
        (tmp_path / "objects.tif").write_bytes(body)
        count = int(tifffile.imread(tmp_path / "objects.tif").max())
        status, body, _ = _infer(base, "cells_000", {"instance_labels": True}, output="json")
        assert status == 200 and json.loads(body)["label_names"] == {f"object {i}": i for i in range(1, count + 1)}

        _train(base, log)  # from the two-class model.pt, on labels of both classes
        from scripts.model.prompt_file import META_KEY, decode_meta

        assert decode_meta(torch.load(model, weights_only=True)[META_KEY])["num_classes"] == 2
        assert read_recipe(model)["class_names"] == ["nucleus", "membrane"]

        # val_split -1, "the bundle's default" in 3D Slicer's training options: validated on the
        # datastore's images, not on train.yaml's dataset_dir (here the demo's synthetic images).
        demo = tmp_path / "data" / "synthetic"
        generate(str(demo), seed=2, n_train=5, n_val=0, n_test=0, modalities="microscopy")
        _train(base, log, val_split=-1, publish="always")  # its model.pt is read below, whatever it scores
        from scripts.engine.splits import image_id, read_split

        recorded = {digest for role in ("training", "validation") for _, digest in read_split(model)[role]}
        assert recorded == {image_id(str(studies / f"cells_{i:03d}.tif")) for i in range(3)}

        # Only model.pt is offered: another file would be served with model.pt's recipe and names.
        shutil.copy(model, bundle / "models" / "other.pt")
        status, body, _ = _infer(base, "cells_000", {"model_filename": "other.pt"})
        assert status == 404 and "no model file 'other.pt'" in json.loads(body)["detail"]

        _prompt_file(generalist, model, ["cell"])  # replaced by a one-class model
        assert _served_labels(base) == {"cell": 1}
        status, body, _ = _infer(base, "cells_000")
        assert status == 200, body[-2000:]
        (tmp_path / "one.tif").write_bytes(body)
        assert set(np.unique(tifffile.imread(tmp_path / "one.tif"))) <= {0, 1}

        # Prompts trained on volumes: a 2D image is refused before inference, naming it and both kinds.
        _prompt_file(generalist, model, ["cell"], image_kind="volume")
        status, body, _ = _infer(base, "cells_000")
        detail = json.loads(body)["detail"]
        assert status == 422 and "cells_000.tif: a 2D image, but the prompts of model.pt were trained on 3D" in detail

        model.unlink()
        assert _served_labels(base) is None
        status, body, _ = _infer(base, "cells_000")
        assert status == 409 and "no trained prompts yet" in json.loads(body)["detail"]

        # Trained outside on files where 2 is the tumour and 1 is ignored: the server writes the
        # tumour as 1, and a label sent back with it would train background. Refused.
        _prompt_file(generalist, model, ["tumour"], classes=[2], label_map={1: 0})
        served = _sha(model)
        _train(base, log, expected="ERROR")
        assert "value 1 (tumour) would be read as background" in _text(log)
        assert _sha(model) == served
    finally:
        _stop(proc)


def test_an_unreadable_model_pt_does_not_stop_the_server(server, label_env, generalist, tmp_path):
    """A model.pt that cannot be read (a garbled record stopped the server at start-up; a truncated
    copy failed every /train): the server starts, the log and inference's 409 name the file and
    the problem, and /train trains new prompts, from untrained ones, that replace it."""
    studies = server[2]
    bundle = _bundle_copy(tmp_path / "ptsam")
    model = bundle / "models" / "model.pt"
    _prompt_file(generalist, model, ["cell"])
    good = model.read_bytes()
    state = torch.load(model, weights_only=True)
    state[RECIPE_KEY] = encode_json({**read_recipe(model), "class_names": 3})
    torch.save(state, model)
    problem = f"{model}: its recipe's class_names 3 is not a list of names"

    env = {"MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
    base, log, proc = _start_server(label_env, generalist, bundle, studies, tmp_path / "server.log", env)
    try:
        assert problem in _text(log)  # said at start-up, before anyone asks
        assert _served_labels(base) is None
        status, body, _ = _infer(base, "cells_000")
        assert status == 409 and json.loads(body)["detail"].startswith(problem), body

        model.write_bytes(good[: len(good) // 2])  # a copy cut short
        status, body, _ = _infer(base, "cells_000")
        detail = json.loads(body)["detail"]
        assert status == 409 and f"PTSAM prompt checkpoint {model} cannot be read" in detail, detail
        assert f"PTSAM prompt checkpoint {model} cannot be read" in _text(log)

        outcome = _train(base, log)
        assert outcome["published"] and "the served one cannot be read" in outcome["reason"], outcome
        assert read_recipe(model)["class_names"] == ["foreground"]  # train.yaml's, as for a first training
        assert _served_labels(base) == {"foreground": 1}
        assert _infer(base, "cells_000")[0] == 200
    finally:
        _stop(proc)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [(["--encoder-engine", "openvino"], "encoder_engine 'openvino' needs the 'openvino' package"),
     (["--encoder-engine", "onnxruntime", "--encoder-bf16", "true"],
      "encoder_bf16 is offered with encoder_engine 'openvino' only, got 'onnxruntime'")],
)  # fmt: skip
def test_an_engine_that_cannot_run_here_stops_the_server_at_start(label_env, generalist, tmp_path, flags, reason):
    """OpenVINO is not in MONAI Label's environment, bfloat16 only runs on it: the server says so
    and exits, before serving."""
    bundle = _bundle_copy(tmp_path / "ptsam")
    (tmp_path / "studies").mkdir()
    command = [str(label_env), str(REPO / "label" / "start.py"), "--studies", str(tmp_path / "studies")]
    command += ["--port", str(_free_port()), "--bundle", str(bundle), *flags]
    env = {**os.environ, "SAM_CHECKPOINT": str(generalist), "SAM_VARIANT": "tiny", "PYTHONPATH": ""}
    env["MONAI_LABEL_SESSION_PATH"] = str(tmp_path / "sessions")
    done = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=180, env=env
    )
    assert done.returncode != 0
    assert reason in done.stdout + done.stderr


def _cors(base: str, origin: str, method: str = "GET", path: str = "/info/", request_method: str = "") -> tuple:
    """(status, lower-cased headers) of a request from a web page at ``origin`` (a preflight where
    ``request_method`` is given)."""
    headers = {"Origin": origin}
    if request_method:
        headers.update(
            {"Access-Control-Request-Method": request_method, "Access-Control-Request-Headers": "content-type"}
        )
    status, answer, _ = _request(f"{base}{path}", method, headers=headers)
    return status, {key.lower(): value for key, value in answer.items()}


def test_cors_is_for_local_viewers(server):
    """Web pages from other origins get no CORS grant (3D Slicer is no browser and needs none);
    the server's own origin, OHIF's development server and CORS_ORIGINS' do, without credentials."""
    base = server[0]
    port = urlsplit(base).port
    for origin in ("http://evil.example", f"http://localhost:{port}.evil.example", "null", "http://localhost:3001"):
        status, headers = _cors(base, origin, "OPTIONS", "/infer/ptsam", "POST")
        assert status == 400 and "access-control-allow-origin" not in headers, origin
        status, headers = _cors(base, origin)
        assert status == 200 and "access-control-allow-origin" not in headers, origin
        assert "access-control-allow-credentials" not in headers

    local = [f"http://localhost:{port}", f"http://127.0.0.1:{port}", "http://localhost:3000", "http://127.0.0.1:3000"]
    for origin in [*local, VIEWER]:
        status, headers = _cors(base, origin, "OPTIONS", "/infer/ptsam", "POST")
        assert status == 200 and headers["access-control-allow-origin"] == origin, (origin, headers)
        assert set(headers["access-control-allow-methods"].split(", ")) == {"GET", "HEAD", "POST", "PUT", "DELETE"}
        assert "access-control-allow-credentials" not in headers
        status, headers = _cors(base, origin)
        assert status == 200 and headers["access-control-allow-origin"] == origin
        assert "access-control-allow-credentials" not in headers
    assert _cors(base, VIEWER, "OPTIONS", "/datastore/image", "PATCH")[0] == 400  # no endpoint takes it


def test_start_refuses_a_bad_cors_origin(label_env, tmp_path):
    command = [str(label_env), str(REPO / "label" / "start.py"), "--studies", str(tmp_path)]
    done = subprocess.run(
        [*command, "--cors-origins", "viewer.example"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
    )
    assert done.returncode != 0 and "--cors-origins: 'viewer.example': not an origin" in done.stderr


def _start_training(base: str, models: Path, known: set) -> Path:
    """POST a long /train; once it runs, its staging folder beside model.pt."""
    request = json.dumps({"max_epochs": 1000}).encode()
    status, _, body = _request(f"{base}/train/ptsam", "POST", request, {"Content-Type": "application/json"})
    assert status == 200, body
    deadline = time.time() + 180
    while not (new := [p for p in models.glob(".train-*") if p not in known]):
        assert time.time() < deadline, "the training made no staging folder"
        time.sleep(0.1)
    return new[0]


def _stop_training(base: str) -> None:
    """DELETE /train/, as 3D Slicer's stop button: MONAI Label kills the training (SIGKILL)."""
    status, _, body = _request(f"{base}/train/", "DELETE")
    assert status == 200 and json.loads(body)["status"] == "STOPPED", body


def test_a_stopped_training_leaves_no_staging_folder_behind(trained, label_env, generalist, tmp_path):
    """A killed training cannot remove its staging folder: the next training removes it before it
    starts, and so does a server's start; a folder a running training holds (here this test's, as
    another server's training on the bundle) is kept."""
    from scripts.common.files import held_folder, release_folder

    base, bundle, studies, *_ = trained
    models = bundle / "models"
    in_use, hold = held_folder(models, ".train-")
    try:
        stopped = _start_training(base, models, {in_use})
        _stop_training(base)
        assert stopped.is_dir()
        again = _start_training(base, models, {in_use, stopped})
        assert not stopped.exists() and in_use.is_dir()
        _stop_training(base)
        assert again.is_dir()
        env = {"MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
        _, log, proc = _start_server(label_env, generalist, bundle, studies, tmp_path / "server.log", env)
        _stop(proc)
        assert not again.exists() and in_use.is_dir()
        assert f"removed {again}, left by a training that was stopped or killed" in _text(log)
    finally:
        release_folder(in_use, hold)


def test_server_stops_cleanly(server):
    base, *_, log, proc = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, _text(log)[-2000:]
    with pytest.raises(OSError):
        _request(f"{base}/info/")
