"""Federated prompt tuning on NVIDIA FLARE (fl/): the simulator run `make fl` starts, checked from
the files it leaves, and the refusals of weights that do not fit, at a site and at the server."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, monai_bundle, quiet
from scripts.model.network import PTSAM
from scripts.model.prompt_file import IncompatibleCheckpointError, decode_meta

FL = REPO / "fl"
CUSTOM = FL / "job" / "app" / "custom"
sys.path.insert(0, str(CUSTOM))  # as FLARE runs the job's custom code

from ptsam_server import PromptUpdateCheck  # noqa: E402
from ptsam_site import SiteConfigError, digest, fit_global, make_algo, site_config  # noqa: E402

PROMPTS = {"md_prompts.tokens": (1, 8, 256), "ie_prompts.tokens": (4, 0, 96), "ptsam_meta": (512,)}
PROMPT_BYTES = 8 * 256 * 4 + 512  # the tokens in float32 and their description: nothing of SAM


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _evaluate(prompts: Path, dataset: Path, generalist: Path, out: Path) -> float:
    """Mean held-out Dice of a prompt file, by the bundle's evaluation workflow as a user runs it."""
    done = monai_bundle(
        "run", "evaluating", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']",
        "--sam_variant", "tiny", "--sam_checkpoint", str(generalist), "--dataset_dir", str(dataset),
        "--model_path", str(prompts), "--output_dir", str(out), "--n_overlays", "0", "--tracking_enabled", "false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 4 and {r["split"] for r in rows} == {"test"}
    return sum(float(r["dice"]) for r in rows) / len(rows)


@pytest.mark.slow
def test_make_fl_runs_three_rounds_of_two_sites_on_the_simulator_and_learns(generalist, tmp_path):
    work = tmp_path / "fl"
    started = time.time()
    done = subprocess.run(
        [sys.executable, "fl/run.py", "--workdir", str(work)],  # what `make fl` runs
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",  # the logs hold UTF-8; the locale may be ASCII
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout, f"{time.time() - started:.0f} s")
    assert "nvflare simulator" in done.stdout and "-n 2 -t 2" in done.stdout

    # the server: three rounds, each averaging both sites, each global model the prompts only
    records = work / "workspace/server/simulate_job/app_server/ptsam_rounds"
    rounds = _jsonl(records / "rounds.jsonl")
    assert [r["after_rounds"] for r in rounds] == [0, 1, 2, 3]
    assert [r["contributors"] for r in rounds[1:]] == [["site-1", "site-2"]] * 3
    net_keys = set(quiet(PTSAM, "tiny", str(generalist)).state_dict())
    globals_ = [torch.load(records / r["file"], weights_only=True) for r in rounds]
    for state, record in zip(globals_, rounds, strict=True):
        assert set(state) == set(PROMPTS) == net_keys
        assert {k: tuple(v.shape) for k, v in state.items()} == PROMPTS
        assert record["bytes"] == PROMPT_BYTES == sum(v.numel() * v.element_size() for v in state.values())
        assert state["ptsam_meta"].dtype == torch.uint8  # the description is kept, never averaged
    assert decode_meta(globals_[-1]["ptsam_meta"]) == decode_meta(globals_[0]["ptsam_meta"])
    assert not torch.allclose(globals_[-1]["md_prompts.tokens"], globals_[0]["md_prompts.tokens"])
    # FLARE's own persistor holds the same final model
    persisted = torch.load(records.parent / "FL_global_model.pt", weights_only=True)["model"]
    assert all(torch.equal(persisted[k], v) for k, v in globals_[-1].items())

    # each site: trained every round, starting from the global model the server had
    for site in ("site-1", "site-2"):
        mine = _jsonl(work / "sites" / site / "eval" / "fl_rounds.jsonl")
        assert [r["round"] for r in mine] == [0, 1, 2]
        assert [r["received"] for r in mine] == [digest(g) for g in globals_[:3]]
        assert all(r["steps"] > 0 and r["sent_bytes"] == PROMPT_BYTES for r in mine)
        assert all(r["sent_keys"] == sorted(PROMPTS) for r in mine)
        assert [r["epoch"] for r in mine] == [2, 4, 6]  # local_epochs 2 per round

    # the federation's prompts segment images neither site has far better than the initial ones
    summary = json.loads((work / "summary.json").read_text())
    dice = summary["held_out_dice"]
    print("held-out Dice after rounds 0..3:", ", ".join(f"{d:.3f}" for d in dice))
    assert dice[3] - dice[0] >= 0.3
    final = _evaluate(records / "global_3.pt", work / "data/held_out/microscopy", generalist, tmp_path / "eval")
    assert final == pytest.approx(dice[3], abs=1e-4)


@pytest.mark.slow
def test_a_site_set_up_for_another_network_stops_the_federation_saying_why(generalist, tmp_path):
    work = tmp_path / "fl"
    prepared = subprocess.run(
        [sys.executable, "fl/prepare.py", "simulation", str(work)], cwd=REPO, capture_output=True, timeout=600
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    config = json.loads((work / "sites/site-2/site.json").read_text())
    config["overrides"]["n_md_prompts"] = 4  # site-2 trains 4 prompt tokens; the federation's model has 8
    (work / "sites/site-2/site.json").write_text(json.dumps(config))
    nvflare = Path(sys.executable).parent / "nvflare"
    done = subprocess.run(
        [str(nvflare), "simulator", str(work / "job"), "-w", str(work / "ws"), "-n", "2", "-t", "2"],
        env={**os.environ, "PTSAM_FL_SITE_CONFIG": str(work / "sites/{site}/site.json")},
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",  # the logs hold UTF-8; the locale may be ASCII
        timeout=600,
    )
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert "site-2: the global model of round 0 was trained for another network: n_md_prompts: file 8, network 4" in log
    assert not (work / "ws/server/simulate_job/app_server/ptsam_rounds/global_1.pt").exists()  # no round averaged


@pytest.fixture()
def site(tiny_sam_file, synthetic, tmp_path):
    """site-1 as the client script builds it, from a configuration file named by the environment."""
    config = {
        "bundle_root": str(REPO / "bundle"),
        "overrides": {
            "dataset_dir": str(synthetic / "microscopy"),
            "sam_variant": "tiny",
            "sam_checkpoint": str(tiny_sam_file),
            "output_dir": str(tmp_path / "eval"),
            "ckpt_dir": str(tmp_path / "models"),
            "device": "$torch.device('cpu')",
            "tracking_enabled": False,
        },
    }
    (tmp_path / "site-1.json").write_text(json.dumps(config))
    algo = quiet(make_algo, "site-1", site_config("site-1", {"PTSAM_FL_SITE_CONFIG": str(tmp_path / "{site}.json")}), 1)
    yield algo
    algo.finalize()


def test_a_site_refuses_global_weights_that_do_not_fit_its_network(site, tiny_sam_file):
    from monai.fl.client.monai_algo import convert_global_weights

    network = site.trainer.network
    own = network.state_dict()
    fitted = fit_global({**own, "ptsam_meta": own["ptsam_meta"].double()}, network, "round 0")  # a server's mean
    assert fitted["ptsam_meta"].dtype == torch.uint8
    assert torch.equal(fitted["md_prompts.tokens"], own["md_prompts.tokens"])

    def refused(change: dict, match: str) -> None:
        with pytest.raises(IncompatibleCheckpointError, match=match):
            fit_global({**own, **change}, network, "site-1: the global model of round 1")

    refused({"md_prompts.tokens": torch.zeros(1, 4, 256)}, r"another shape: md_prompts.tokens: \(1, 4, 256\)")
    # same size, another shape: MONAI FL alone would reshape it and train on scrambled tokens
    scrambled = {**own, "md_prompts.tokens": torch.zeros(2, 4, 256)}
    assert convert_global_weights(scrambled, dict(own))[1] == len(own)
    refused({"md_prompts.tokens": torch.zeros(2, 4, 256)}, r"\(2, 4, 256\) from the server, \(1, 8, 256\) here")
    refused({"md_prompts.tokens": torch.full((1, 8, 256), float("nan"))}, "NaN or inf")
    refused({"extra.tokens": torch.zeros(1)}, r"extra \['extra.tokens'\]")
    other = quiet(PTSAM, "tiny", str(tiny_sam_file), n_md_prompts=4, num_classes=2).state_dict()
    with pytest.raises(IncompatibleCheckpointError, match="n_md_prompts: file 4, network 8"):
        fit_global(other, network, "the global model")
    with pytest.raises(IncompatibleCheckpointError, match="not a PTSAM prompt checkpoint"):
        fit_global({k: v for k, v in own.items() if k != "ptsam_meta"}, network, "the global model")


def test_a_site_without_its_configuration_says_what_to_set(tmp_path):
    with pytest.raises(SiteConfigError, match="set PTSAM_FL_SITE_CONFIG"):
        site_config("site-1", {})
    with pytest.raises(SiteConfigError, match=r"no configuration file .*site-1\.json"):
        site_config("site-1", {"PTSAM_FL_SITE_CONFIG": str(tmp_path / "{site}.json")})
    (tmp_path / "site-1.json").write_text(json.dumps({"bundle_root": str(REPO / "bundle"), "overrides": {}}))
    with pytest.raises(SiteConfigError, match="needs overrides.dataset_dir"):
        site_config("site-1", {"PTSAM_FL_SITE_CONFIG": str(tmp_path / "{site}.json")})
    (tmp_path / "site-1.json").write_text(json.dumps({"bundle_root": str(tmp_path), "overrides": {"dataset_dir": "x"}}))
    with pytest.raises(SiteConfigError, match="has no configs/fl_train.yaml"):
        site_config("site-1", {"PTSAM_FL_SITE_CONFIG": str(tmp_path / "{site}.json")})


def test_the_server_refuses_a_site_update_of_another_shape(tiny_sam_file):
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    own = quiet(PTSAM, "tiny", str(tiny_sam_file)).state_dict()
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(own, {}), private=True, sticky=False)

    def update(params: dict):
        shareable = FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.DIFF, current_round=2))
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: "site-2"})
        return shareable

    check = PromptUpdateCheck()
    fits = update({k: torch.zeros_like(v) for k, v in own.items()})
    assert check.process(fits, fl_ctx) is fits
    with pytest.raises(ValueError, match=r"update of site-2 in round 2: md_prompts.tokens: \(1, 4, 256\) from site-2"):
        check.process(update({**own, "md_prompts.tokens": torch.zeros(1, 4, 256)}), fl_ctx)
    with pytest.raises(ValueError, match=r"missing \['ptsam_meta'\]"):
        check.process(update({k: v for k, v in own.items() if k != "ptsam_meta"}), fl_ctx)


def test_a_job_for_a_real_federation_takes_its_rounds_sites_and_epochs(tiny_sam_file, tmp_path):
    prepare = _module("fl_prepare", FL / "prepare.py")
    overrides = {"sam_variant": "tiny", "sam_checkpoint": str(tiny_sam_file)}
    job = quiet(prepare.make_job, tmp_path / "job", overrides, rounds=20, clients=4, local_epochs=1)
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    assert server["workflows"][0]["args"] | {"num_rounds": 20, "num_clients": 4} == server["workflows"][0]["args"]
    assert json.loads((job / "meta.json").read_text())["min_clients"] == 4
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"]["task_script_args"] == "--local_epochs 1"
    initial = torch.load(job / prepare.INITIAL, weights_only=True)
    assert {k: tuple(v.shape) for k, v in initial.items()} == PROMPTS
    assert decode_meta(initial["ptsam_meta"])["backbone_source"].endswith(tiny_sam_file.name)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        prepare.make_job(tmp_path / "bad", overrides, rounds=0)
