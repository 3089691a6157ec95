"""Federated prompt tuning on NVIDIA FLARE (fl/): the simulator run `make fl` starts, checked from
the files it leaves, and the refusals of weights that do not fit, at a site and at the server."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, monai_bundle, quiet
from scripts.engine.recipe import LEGACY, RecipeMismatchError, from_knobs
from scripts.model.network import PTSAM
from scripts.model.prompt_file import (
    RECIPE_KEY,
    IncompatibleCheckpointError,
    decode_meta,
    load_prompts,
    read_prompt_file,
    read_recipe,
    save_prompts,
)

FL = REPO / "fl"
CUSTOM = FL / "job" / "app" / "custom"
sys.path.insert(0, str(CUSTOM))  # as FLARE runs the job's custom code

from ptsam_server import ImageWeightedAggregator, PromptUpdateCheck  # noqa: E402
from ptsam_site import (  # noqa: E402
    DESCRIPTIONS,
    SiteConfigError,
    digest,
    fit_global,
    make_algo,
    site_config,
    site_recipe,
    training_images,
    update_meta,
)

SITES = ("site-1", "site-2")
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

    # the server: three rounds, each averaging both sites by their training images, each global
    # model the prompts and the federation's recipe only
    records = work / "workspace/server/simulate_job/app_server/ptsam_rounds"
    rounds = _jsonl(records / "rounds.jsonl")
    assert [r["after_rounds"] for r in rounds] == [0, 1, 2, 3]
    assert [r["contributors"] for r in rounds[1:]] == [["site-1", "site-2"]] * 3
    images = {s: _jsonl(work / "sites" / s / "eval" / "fl_rounds.jsonl")[0]["training_images"] for s in SITES}
    assert [r["training_images"] for r in rounds] == [{}] + [images] * 3 and min(images.values()) > 0
    net_keys = set(quiet(PTSAM, "tiny", str(generalist)).state_dict())
    globals_ = [torch.load(records / r["file"], weights_only=True) for r in rounds]
    recipe = globals_[0][RECIPE_KEY]
    for state, record in zip(globals_, rounds, strict=True):
        assert set(state) == set(PROMPTS) | {RECIPE_KEY} and set(PROMPTS) == net_keys
        assert {k: tuple(v.shape) for k, v in state.items() if k != RECIPE_KEY} == PROMPTS
        on_disk = sum(v.numel() * v.element_size() for v in state.values())
        assert record["bytes"] == PROMPT_BYTES + recipe.numel() == on_disk
        assert state["ptsam_meta"].dtype == torch.uint8  # the descriptions are kept, never averaged
        assert torch.equal(state[RECIPE_KEY], recipe)
    assert decode_meta(globals_[-1]["ptsam_meta"]) == decode_meta(globals_[0]["ptsam_meta"])
    assert decode_meta(recipe)["layout"] == "display" and decode_meta(recipe)["image_size"] == 256
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
        assert all(r["received_bytes"] == PROMPT_BYTES + recipe.numel() for r in mine)
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
@pytest.mark.parametrize(
    "override, refusal",
    [  # site-2 trains 4 prompt tokens; the federation's model has 8
        ({"n_md_prompts": 4}, "was trained for another network: n_md_prompts: file 8, network 4"),
        # site-2 maps intensities otherwise than the job's recipe says
        (
            {"intensity": "percentile"},
            "was trained with another recipe than this site's (intensity: the federation's 'auto', this site's "
            "'percentile')",
        ),
    ],
    ids=["network", "recipe"],
)
def test_a_site_set_up_for_another_network_or_recipe_stops_the_federation_saying_why(
    generalist, tmp_path, override, refusal
):
    work = tmp_path / "fl"
    prepared = subprocess.run(
        [sys.executable, "fl/prepare.py", "simulation", str(work)], cwd=REPO, capture_output=True, timeout=600
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    config = json.loads((work / "sites/site-2/site.json").read_text())
    config["overrides"].update(override)
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
    assert f"site-2: the global model of round 0 {refusal}" in log
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


def test_a_site_refuses_global_weights_that_do_not_fit_its_network(site, tiny_sam_file, tmp_path):
    from monai.fl.client.monai_algo import convert_global_weights

    network = site.trainer.network
    recipe = site_recipe(site)
    own = network.state_dict()
    job = read_prompt_file(save_prompts(network, tmp_path / "global.pt", recipe))  # as the job records it
    assert set(job) == set(own) | {RECIPE_KEY}
    fitted = fit_global({**job, "ptsam_meta": own["ptsam_meta"].double()}, network, "round 0", recipe)  # a mean
    assert set(fitted) == set(own) and fitted["ptsam_meta"].dtype == torch.uint8
    assert torch.equal(fitted["md_prompts.tokens"], own["md_prompts.tokens"])

    def refused(change: dict, match: str) -> None:
        with pytest.raises(IncompatibleCheckpointError, match=match):
            fit_global({**job, **change}, network, "site-1: the global model of round 1", recipe)

    refused({"md_prompts.tokens": torch.zeros(1, 4, 256)}, r"another shape: md_prompts.tokens: \(1, 4, 256\)")
    # same size, another shape: MONAI FL alone would reshape it and train on scrambled tokens
    scrambled = {**own, "md_prompts.tokens": torch.zeros(2, 4, 256)}
    assert convert_global_weights(scrambled, dict(own))[1] == len(own)
    refused({"md_prompts.tokens": torch.zeros(2, 4, 256)}, r"\(2, 4, 256\) from the server, \(1, 8, 256\) here")
    refused({"md_prompts.tokens": torch.full((1, 8, 256), float("nan"))}, "NaN or inf")
    refused({"extra.tokens": torch.zeros(1)}, r"extra \['extra.tokens'\]")
    other = quiet(PTSAM, "tiny", str(tiny_sam_file), n_md_prompts=4, num_classes=2).state_dict()
    with pytest.raises(IncompatibleCheckpointError, match="n_md_prompts: file 4, network 8"):
        fit_global(other, network, "the global model", recipe)
    with pytest.raises(IncompatibleCheckpointError, match="not a PTSAM prompt checkpoint"):
        fit_global({k: v for k, v in job.items() if k != "ptsam_meta"}, network, "the global model", recipe)


def test_a_site_refuses_a_job_of_another_recipe_naming_itself_and_each_knob(site, tiny_sam_file, tmp_path):
    prepare = _module("fl_prepare", FL / "prepare.py")
    network, recipe = site.trainer.network, site_recipe(site)
    assert recipe["intensity"] == "auto" and recipe["layout"] == "display" and recipe["classes"] == [1]
    # what fit_global is given at the site: this site's recipe, and its weight: its training images
    assert training_images(site) == len(site.train_workflow.parser.get_parsed_content("train#dataset#data")) > 0

    # the admin's job records the federation's recipe; here, other intensities and layout than site-1's
    args = ["job", str(tmp_path / "job"), "--sam_variant", "tiny", "--sam_checkpoint", str(tiny_sam_file)]
    quiet(prepare.main, [*args, "--set", "intensity=percentile", "--set", "layout=stored"])
    initial = read_prompt_file(tmp_path / "job" / prepare.INITIAL)
    federation = read_recipe(tmp_path / "job" / prepare.INITIAL)
    assert federation == json.loads(json.dumps({**recipe, "intensity": "percentile", "layout": "stored"}))
    match = (
        r"site-1: the global model of round 0 was trained with another recipe than this site's \("
        r"intensity: the federation's 'percentile', this site's 'auto'; "
        r"layout: the federation's 'stored', this site's 'display'\)"
    )
    with pytest.raises(RecipeMismatchError, match=match):
        fit_global(initial, network, "site-1: the global model of round 0", recipe)
    # other classes (label values), image size: the same refusal
    for knob, value in (("classes", [2]), ("image_size", 512)):
        with pytest.raises(RecipeMismatchError, match=re.escape(f"{knob}: the federation's {value!r}, this site's")):
            fit_global({**initial, RECIPE_KEY: _recipe_entry({**recipe, knob: value})}, network, "round 0", recipe)
    # a job made before the recipe was recorded: refused, saying how to make it again
    with pytest.raises(RecipeMismatchError, match="records no recipe .*fl/prepare.py job"):
        fit_global({k: v for k, v in initial.items() if k != RECIPE_KEY}, network, "round 0", recipe)

    # the same job with site-1's recipe: its prompts fit, and the job's other knobs stay train.yaml's
    quiet(prepare.main, args)
    assert read_recipe(tmp_path / "job" / prepare.INITIAL) == json.loads(json.dumps(recipe))
    fitted = fit_global(read_prompt_file(tmp_path / "job" / prepare.INITIAL), network, "round 0", recipe)
    assert set(fitted) == set(network.state_dict())
    with pytest.raises(SystemExit):
        quiet(prepare.main, [*args, "--set", "sam_variant=vit_b"])  # not a recipe knob


def _recipe_entry(recipe: dict) -> torch.Tensor:
    from scripts.model.prompt_file import encode_json

    return encode_json(recipe)


def _flare_update(params: dict, site: str, meta: dict, round_: int = 2):
    """A site's result as the server's filters get it: the Client API's FLModel as a Shareable."""
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    shareable = FLModelUtils.to_shareable(
        FLModel(params=params, params_type=ParamsType.DIFF, current_round=round_, meta=dict(meta))
    )
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    return shareable


def _server_context(global_state: dict):
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants

    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(dict(global_state), {}), private=True, sticky=False)
    return fl_ctx


RECIPE = from_knobs(**{**LEGACY, "layout": "display"}, image_size=256)


def test_the_server_refuses_the_update_of_a_site_of_another_recipe_before_averaging(tiny_sam_file, tmp_path):
    net = quiet(PTSAM, "tiny", str(tiny_sam_file))
    federation = read_prompt_file(save_prompts(net, tmp_path / "initial_prompts.pt", RECIPE))
    fl_ctx = _server_context(federation)
    change = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}  # what a site sends: no recipe
    check = PromptUpdateCheck()
    fits = _flare_update(change, "site-1", update_meta(5, 6, RECIPE))
    assert check.process(fits, fl_ctx) is fits

    other = {**RECIPE, "intensity": "window", "a_min": -100.0, "label_map": {255: 1}}
    match = (
        r"refused the update of site-2 in round 2: trained with another recipe than the federation's \("
        r"a_min: the federation's -160.0, site-2's -100.0; intensity: the federation's 'auto', site-2's 'window'; "
        r"label_map: the federation's \{\}, site-2's \{'255': 1\}\)"
    )
    with pytest.raises(ValueError, match=match):
        check.process(_flare_update(change, "site-2", update_meta(5, 6, other)), fl_ctx)
    no_recipe = {k: v for k, v in update_meta(5, 6, RECIPE).items() if k != "ptsam_recipe"}
    with pytest.raises(ValueError, match="site-2 does not say which recipe it trained with"):
        check.process(_flare_update(change, "site-2", no_recipe), fl_ctx)
    for images in (0, None, True):
        meta = {**update_meta(5, 6, RECIPE), "ptsam_training_images": images}
        with pytest.raises(ValueError, match="site-2 in round 2: no positive number of training images"):
            check.process(_flare_update(change, "site-2", meta), fl_ctx)
    # a job whose initial model records no recipe: no update is averaged
    unrecorded = _server_context({k: v for k, v in federation.items() if k != RECIPE_KEY})
    with pytest.raises(ValueError, match="the global model records no recipe"):
        check.process(_flare_update(change, "site-1", update_meta(5, 6, RECIPE)), unrecorded)


def _job_builder():
    from nvflare.fuel.utils.component_builder import ComponentBuilder

    class JobBuilder(ComponentBuilder):
        def get_module_scanner(self):
            return None  # the job names every class by its full path

    return JobBuilder()


def test_the_server_averages_the_sites_weighted_by_training_images_not_steps(tiny_sam_file, tmp_path):
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    # the job's server: FLARE's FedAvg with this aggregator, as config_fed_server.json builds it
    server = json.loads((FL / "job/app/config/config_fed_server.json").read_text())
    fedavg = _job_builder().build_component(server["workflows"][0])
    assert isinstance(fedavg.aggregator, ImageWeightedAggregator)

    # real prompt files: the federation's initial prompts and what two sites trained from them
    net = quiet(PTSAM, "tiny", str(tiny_sam_file), n_md_prompts=8, n_ie_prompts=2)
    initial = read_prompt_file(save_prompts(net, tmp_path / "initial_prompts.pt", RECIPE))
    trained, changes = {}, {}
    for site in ("site-1", "site-2"):  # each site starts from the global prompts and trains its own way
        net.load_state_dict(initial)
        with torch.no_grad():
            for tokens in (net.md_prompts.tokens, net.ie_prompts.tokens):
                tokens.add_(torch.randn_like(tokens))
        trained[site] = read_prompt_file(save_prompts(net, tmp_path / f"{site}.pt", RECIPE))
        # MonaiAlgo's update: the change of every entry of the site's state dict
        changes[site] = {k: trained[site][k] - initial[k] for k in net.state_dict()}
    # site-1: 6 images, 3 steps (batch 4); site-2: 2 images, 12 steps (batch 1, more epochs)
    images, steps = {"site-1": 6, "site-2": 2}, {"site-1": 3, "site-2": 12}

    fl_ctx, check = _server_context(initial), PromptUpdateCheck()
    aggregator = fedavg.aggregator
    for site in ("site-1", "site-2"):  # filtered, then handed to the aggregator as FedAvg does
        meta = update_meta(steps[site], images[site], RECIPE)
        result = FLModelUtils.from_shareable(check.process(_flare_update(changes[site], site, meta), fl_ctx))
        result.meta["client_name"] = site
        aggregator.accept_model(result)
    averaged = aggregator.aggregate_model()
    assert averaged.meta["ptsam_training_images_averaged"] == images
    assert set(averaged.params) == {"md_prompts.tokens", "ie_prompts.tokens"}  # descriptions are not averaged
    for key, mean in averaged.params.items():  # exactly sum(n_i * change_i) / sum(n_i)
        expected = (6 * changes["site-1"][key].double() + 2 * changes["site-2"][key].double()) / 8
        assert mean.dtype == torch.float32 and torch.equal(mean, expected.float())

    # the new global model (FedAvg adds the mean change): the image-weighted mean of the sites' prompts
    glob = FLModelUtils.update_model(FLModel(params=dict(initial), params_type=ParamsType.FULL), averaged).params
    for key in averaged.params:
        by_images = (6 * trained["site-1"][key].double() + 2 * trained["site-2"][key].double()) / 8
        by_steps = (3 * trained["site-1"][key].double() + 12 * trained["site-2"][key].double()) / 15
        assert (glob[key].double() - by_images).abs().max() <= 1e-6
        assert (glob[key].double() - by_steps).abs().max() >= 0.5  # what weighting by steps gave
    assert all(torch.equal(glob[k], initial[k]) for k in DESCRIPTIONS if k in initial)
    # a prompt file the bundle loads, with the federation's recipe
    torch.save(glob, tmp_path / "global_1.pt")
    load_prompts(quiet(PTSAM, "tiny", str(tiny_sam_file), n_md_prompts=8, n_ie_prompts=2), tmp_path / "global_1.pt")
    assert read_recipe(tmp_path / "global_1.pt") == json.loads(json.dumps(RECIPE))

    with pytest.raises(ValueError, match="no site update to average"):
        aggregator.aggregate_model()


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


def test_the_server_refuses_a_site_update_of_another_shape(tiny_sam_file, tmp_path):
    net = quiet(PTSAM, "tiny", str(tiny_sam_file))
    own = net.state_dict()
    fl_ctx = _server_context(read_prompt_file(save_prompts(net, tmp_path / "initial_prompts.pt", RECIPE)))
    meta = update_meta(5, 6, RECIPE)

    check = PromptUpdateCheck()
    fits = _flare_update({k: torch.zeros_like(v) for k, v in own.items()}, "site-2", meta)
    assert check.process(fits, fl_ctx) is fits
    with pytest.raises(ValueError, match=r"update of site-2 in round 2: md_prompts.tokens: \(1, 4, 256\) from site-2"):
        check.process(_flare_update({**own, "md_prompts.tokens": torch.zeros(1, 4, 256)}, "site-2", meta), fl_ctx)
    with pytest.raises(ValueError, match=r"missing \['ptsam_meta'\]"):
        check.process(_flare_update({k: v for k, v in own.items() if k != "ptsam_meta"}, "site-2", meta), fl_ctx)


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
    assert {k: tuple(v.shape) for k, v in initial.items() if k != RECIPE_KEY} == PROMPTS
    assert read_recipe(job / prepare.INITIAL)["image_size"] == 256  # the federation's recipe, train.yaml's
    assert decode_meta(initial["ptsam_meta"])["backbone_source"].endswith(tiny_sam_file.name)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        prepare.make_job(tmp_path / "bad", overrides, rounds=0)
