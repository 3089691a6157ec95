"""The recipe travels with the prompts: what training saw, evaluation and inference see, or refuse."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from helpers import BUNDLE, monai_bundle, quiet
from scripts.engine.recipe import ADDED, KNOBS, LEGACY, RecipeMismatchError, as_trained, from_knobs
from scripts.model.network import PTSAM
from scripts.model.prompt_file import RECIPE_KEY, load_prompts, read_recipe, save_prompts

WINDOW = ("--intensity", "window", "--a_min", "-100", "--a_max", "200")


@pytest.fixture(scope="module")
def ct_model(synthetic, tmp_path_factory) -> Path:
    """A `tiny` model trained one epoch on the synthetic CT with a CT window of its own."""
    out = tmp_path_factory.mktemp("ct_model")
    done = monai_bundle(
        "run", "training", "--config_file", "configs/train.yaml", "--sam_variant", "tiny", "--epochs", "1",
        "--dataset_dir", str(synthetic / "ct"), "--output_dir", str(out / "eval"), "--ckpt_dir", str(out / "models"),
        "--slices_per_volume", "2", *WINDOW,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _infer(synthetic: Path, model: Path, out: Path, *extra: str):
    return monai_bundle(
        "run", "inference", "--config_file", "configs/inference.yaml", "--sam_variant", "tiny",
        "--dataset_dir", str(synthetic / "ct"), "--ckpt_dir", str(model / "models"), "--output_dir", str(out), *extra,
    )  # fmt: skip


def test_model_pt_records_the_training_recipe(ct_model):
    recipe = read_recipe(ct_model / "models" / "model.pt")
    assert set(recipe) == {*KNOBS, "image_kind"}
    assert recipe["image_kind"] == "volume"  # found from the NIfTI volumes and the DICOM series it learned from
    assert (recipe["intensity"], recipe["a_min"], recipe["a_max"]) == ("window", -100.0, 200.0)
    assert recipe["image_size"] == 256 and recipe["classes"] == [1] and recipe["class_names"] == ["foreground"]
    assert recipe["layout"] == "display"  # new trainings: every format as viewers show it
    net = quiet(PTSAM, "tiny")
    load_prompts(net, ct_model / "models" / "model.pt")  # the recipe entry is not a weight: a strict load works


def test_inference_without_flags_sees_what_training_saw(synthetic, ct_model, tmp_path):
    plain = _infer(synthetic, ct_model, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    flagged = _infer(synthetic, ct_model, tmp_path / "flagged", *WINDOW)
    assert flagged.returncode == 0, flagged.stderr[-3000:]
    default = _infer(synthetic, ct_model, tmp_path / "default", "--intensity", "window")  # agrees: the rest as recorded
    assert default.returncode == 0, default.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert len(names) == 3
    for name in names:
        same = (tmp_path / "plain" / name).read_bytes()
        assert same == (tmp_path / "flagged" / name).read_bytes() == (tmp_path / "default" / name).read_bytes()


def test_a_contradicting_flag_is_refused_before_any_work(synthetic, ct_model, tmp_path):
    done = _infer(synthetic, ct_model, tmp_path / "out", "--intensity", "percentile", "--a_max", "300")
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    assert "intensity: model.pt has 'window', given 'percentile'" in done.stderr
    assert "a_max: model.pt has 200.0, given 300.0" in done.stderr
    evaluate = monai_bundle(
        "run", "evaluating", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", "--sam_variant", "tiny",
        "--dataset_dir", str(synthetic / "ct"), "--ckpt_dir", str(ct_model / "models"),
        "--output_dir", str(tmp_path / "eval"), "--a_min", "-160",
    )  # fmt: skip
    assert evaluate.returncode != 0 and "a_min: model.pt has -100.0, given -160.0" in evaluate.stderr
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_evaluation_refuses_images_of_another_kind_before_any_work(synthetic, ct_model, tmp_path):
    """Prompts of CT volumes scored on 2D microscopy: each test image is named, nothing is scored."""
    done = monai_bundle(
        "run", "evaluating", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", "--sam_variant", "tiny",
        "--dataset_dir", str(synthetic / "microscopy"), "--ckpt_dir", str(ct_model / "models"),
        "--output_dir", str(tmp_path / "eval"),
    )  # fmt: skip
    assert done.returncode != 0 and "2 problem(s) in the dataset" in done.stderr, done.stderr[-3000:]
    for image in (synthetic / "microscopy" / "imagesTr" / f"cells_{i:03d}.tif" for i in (6, 7)):  # the test list
        assert (
            f"{image}: a 2D image, but the prompts of model.pt were trained on 3D volumes (image_kind 'volume')"
            in done.stderr
        )
    assert "Engine run" not in done.stdout + done.stderr and not (tmp_path / "eval" / "metrics.csv").exists()


def test_evaluation_takes_the_recipe_from_model_pt(ct_model):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.yaml"), str(BUNDLE / "configs" / "evaluate.yaml")])
    parser.update({"bundle_root": str(BUNDLE), "sam_variant": "tiny", "ckpt_dir": str(ct_model / "models")})
    intensity = parser.get_parsed_content("preprocessing_head").transforms[2]
    assert (intensity.mode, intensity.a_min, intensity.a_max) == ("window", -100.0, 200.0)


def test_an_old_model_pt_loads_with_the_old_defaults_and_a_note(tmp_path, caplog):
    net = quiet(PTSAM, "tiny")
    old = save_prompts(net, tmp_path / "model.pt")  # no recipe: as written before recipes were recorded
    assert RECIPE_KEY not in torch.load(old, weights_only=True) and read_recipe(old) is None
    with caplog.at_level(logging.WARNING):
        recipe = as_trained(old, 256)
    assert recipe == from_knobs(**LEGACY, **ADDED, image_size=256) and recipe["layout"] == "stored"
    assert "records no preprocessing recipe" in caplog.text
    assert as_trained(old, 256, intensity="window")["intensity"] == "window"  # nothing recorded to contradict


def test_a_model_pt_of_before_the_layout_knob_keeps_the_stored_layout(tmp_path):
    """Its prompts were trained on arrays as read: evaluation, inference and MONAI Label's
    inference (all inference.yaml) keep feeding them so, and refuse being told otherwise."""
    recipe = from_knobs(**LEGACY, **ADDED, image_size=256)
    del recipe["layout"]
    path = save_prompts(quiet(PTSAM, "tiny"), tmp_path / "model.pt", recipe)
    assert "layout" not in read_recipe(path)
    assert as_trained(path, 256)["layout"] == as_trained(path, 256, layout="stored")["layout"] == "stored"
    with pytest.raises(RecipeMismatchError, match="layout: model.pt has 'stored', given 'display'"):
        as_trained(path, 256, layout="display")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "sam_variant": "tiny", "model_path": str(path)})
    assert parser.get_parsed_content("preprocessing").transforms[-1].layout == "stored"


def test_a_training_state_of_before_the_layout_knob_resumes_only_as_stored(tmp_path):
    import json

    from scripts.engine.resume import ResumeMismatchError, check_identity

    recipe = from_knobs(**LEGACY, **ADDED, image_size=256)
    old = {k: v for k, v in recipe.items() if k != "layout"}
    state = {"identity": json.dumps({**old, "seed": 0}, sort_keys=True)}
    check_identity(tmp_path / "state.ckpt", state, {"recipe": recipe, "seed": 0})  # layout: stored
    with pytest.raises(ResumeMismatchError, match=r"--layout 'stored' \(now 'display'\)"):
        check_identity(tmp_path / "state.ckpt", state, {"recipe": {**recipe, "layout": "display"}, "seed": 0})


def test_values_compare_in_canonical_form(tmp_path):
    recipe = from_knobs(**{**LEGACY, **ADDED, "label_map": {255: 1}, "a_min": -100}, image_size=256)
    path = save_prompts(quiet(PTSAM, "tiny"), tmp_path / "model.pt", recipe)
    assert read_recipe(path)["label_map"] == {"255": 1}  # JSON keys are strings ...
    assert as_trained(path, 256, label_map={255: 1}, a_min=-100.0) == recipe  # ... and still agree
    with pytest.raises(RecipeMismatchError, match=r"label_map: model.pt has \{255: 1\}, given \{255: 2\}"):
        as_trained(path, 256, label_map={255: 2})
    with pytest.raises(RecipeMismatchError, match="image_size: model.pt has 256, given 1024"):
        as_trained(path, 1024)


def test_training_defaults_are_what_old_files_assume():
    """LEGACY is a fact about older files: the training config's defaults must not drift from it
    unnoticed (change both, knowingly, if a default ever changes)."""
    config = ConfigParser.load_config_file(str(BUNDLE / "configs" / "train.yaml"))
    assert {k: config[k] for k in LEGACY} == LEGACY
    assert set(ADDED) <= set(config) and config["layout"] == "display" != ADDED["layout"]  # knowingly: see ADDED
