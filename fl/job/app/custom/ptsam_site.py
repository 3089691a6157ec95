"""What a PTSAM site needs besides NVIDIA FLARE: its own configuration, MONAI FL's client on the
bundle, the check that a global model fits this site's network and recipe before a round trains
on it, and what the site tells the server with its update.

Each site says where its copy of the bundle, its SAM weights and its data are in a JSON (or YAML)
file named by ``PTSAM_FL_SITE_CONFIG``; ``{site}`` in that path is replaced by the FLARE site name,
so one value serves every site the simulator runs on one machine:

    {"bundle_root": "/opt/ptsam/bundle",
     "overrides": {"dataset_dir": "/data/ptsam", "sam_variant": "vit_b",
                   "sam_checkpoint": "/models/sam_vit_b_01ec64.pth"}}

``overrides`` are values of train.yaml + fl_train.yaml (dataset_dir, output_dir, ckpt_dir, device, ...).
The recipe knobs among them (intensity, classes, layout, ...; ``scripts.engine.recipe``) must give
the job's recipe, which the global model records as ``ptsam_recipe``: prompts trained on images
prepared otherwise, or on labels meaning other classes, would be averaged into nonsense. A site
refuses a global model whose recipe differs from its own before training, naming the knobs, and
sends its recipe and its number of training images with each update (``update_meta``): the
server refuses the update of another recipe, and weighs each site by its training images.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

SITE_CONFIG_ENV = "PTSAM_FL_SITE_CONFIG"
CONFIGS = ["configs/train.yaml", "configs/fl_train.yaml"]

# The entries of a prompt state dict that describe the prompts rather than being them (named as in
# the bundle's scripts.model.prompt_file, which the server does not have): never averaged.
META = "ptsam_meta"
RECIPE = "ptsam_recipe"
DESCRIPTIONS = (META, RECIPE, "ptsam_split")
# What a site sends with its update (FLModel meta) besides the prompts' change.
TRAINING_IMAGES = "ptsam_training_images"  # its weight in the average
SITE_RECIPE = "ptsam_recipe"  # JSON, as the global model's entry holds it


class SiteConfigError(ValueError):
    """This site's configuration is missing or wrong."""


def site_config(site: str, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The configuration of ``site``, read from the file ``PTSAM_FL_SITE_CONFIG`` names."""
    template = environ.get(SITE_CONFIG_ENV)
    if not template:
        raise SiteConfigError(
            f"site {site}: set {SITE_CONFIG_ENV} to this site's configuration file "
            f"(JSON or YAML with bundle_root and overrides; '{{site}}' in the path becomes the site name)"
        )
    path = Path(template.replace("{site}", site))
    if not path.is_file():
        raise SiteConfigError(f"site {site}: no configuration file {path} ({SITE_CONFIG_ENV}={template})")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise SiteConfigError(f"site {site}: {path} holds no mapping")
    unknown = set(config) - {"bundle_root", "overrides"}
    if unknown:
        raise SiteConfigError(f"site {site}: {path} has unknown keys {sorted(unknown)} (known: bundle_root, overrides)")
    bundle = Path(str(config.get("bundle_root", "")))
    if not (bundle / CONFIGS[1]).is_file():
        raise SiteConfigError(f"site {site}: bundle_root {str(bundle)!r} in {path} has no {CONFIGS[1]}")
    overrides = config.get("overrides") or {}
    if not isinstance(overrides, dict) or "dataset_dir" not in overrides:
        raise SiteConfigError(f"site {site}: {path} needs overrides.dataset_dir, the folder of this site's data")
    return {"bundle_root": str(bundle.resolve()), "overrides": overrides, "path": str(path)}


def import_bundle(bundle_root: str) -> None:
    """Make the bundle's code importable as ``scripts.*``, as MONAI does for a bundle."""
    if bundle_root not in sys.path:
        sys.path.insert(0, bundle_root)


def make_algo(site: str, config: Mapping[str, Any], local_epochs: int):
    """MONAI FL's client on train.yaml + fl_train.yaml with this site's overrides, initialised.

    Training only: FedAvg sends no validation task, and an evaluator would build a second SAM."""
    from monai.fl.client import MonaiAlgo
    from monai.fl.utils.constants import ExtraItems

    import_bundle(config["bundle_root"])
    overrides = dict(config["overrides"])
    algo = MonaiAlgo(
        bundle_root=config["bundle_root"],
        local_epochs=local_epochs,
        config_train_filename=CONFIGS,
        train_kwargs=overrides,
        config_evaluate_filename=None,
    )
    algo.initialize(extra={ExtraItems.CLIENT_NAME: site})
    return algo


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def site_recipe(algo: Any) -> dict[str, Any]:
    """The recipe this site trains with: train.yaml + fl_train.yaml and its overrides."""
    return dict(algo.train_workflow.parser.get_parsed_content("recipe"))


def training_images(algo: Any) -> int:
    """How many training images (fields, volumes) this site's rounds learn from."""
    return len(algo.trainer.data_loader.dataset)


def update_meta(steps: int, images: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """What a site's update carries besides the change of the prompts: the steps it trained (a
    record), the training images it learned from (its weight in the average) and its recipe."""
    from nvflare.apis.fl_constant import FLMetaKey

    return {
        FLMetaKey.NUM_STEPS_CURRENT_ROUND: int(steps),
        TRAINING_IMAGES: int(images),
        SITE_RECIPE: json.dumps(dict(recipe), sort_keys=True),
    }


def check_recipe(entry: Any, recipe: Mapping[str, Any], source: str) -> None:
    """Refuse a global model (its ``ptsam_recipe`` entry) made for another recipe than ``recipe``."""
    from scripts.engine.recipe import RecipeMismatchError, describe_clashes, normalize
    from scripts.model.prompt_file import decode_meta

    theirs = decode_meta(entry)
    if theirs is None:
        raise RecipeMismatchError(
            f"{source} records no recipe ({RECIPE}): the job was made without one; make it again with "
            "fl/prepare.py job, which records the federation's recipe in its initial prompts"
        )
    try:
        theirs = normalize(theirs)
    except ValueError as err:
        raise RecipeMismatchError(f"{source} records an incomplete recipe: {err}") from err
    differ = describe_clashes(theirs, normalize(recipe), "the federation's", "this site's")
    if differ:
        raise RecipeMismatchError(
            f"{source} was trained with another recipe than this site's ({differ}). Every site trains "
            f"with the job's recipe: set these knobs in this site's configuration ({SITE_CONFIG_ENV}, "
            "overrides) to the federation's values."
        )


def fit_global(
    params: Mapping[str, Any], network: torch.nn.Module, source: str, recipe: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The global model ``params`` as tensors for ``network``, or ``IncompatibleCheckpointError``
    (``RecipeMismatchError`` for another recipe than this site's ``recipe``).

    Refused, naming what differs: a model of another network (its ``ptsam_meta`` names the
    variant, prompt counts, classes and SAM weights it was made for), of another recipe (its
    ``ptsam_recipe``: intensities, classes, layout, size, ...), missing or extra entries, another
    shape (MONAI FL would reshape a tensor of the same size without a word), NaN or inf."""
    from scripts.model.prompt_file import META_KEY, IncompatibleCheckpointError, check_meta, network_meta

    if not isinstance(params, Mapping) or not params:
        raise IncompatibleCheckpointError(f"{source} holds no weights")
    check_meta(params.get(META_KEY), network_meta(network), source=source)
    check_recipe(params.get(RECIPE), recipe, source)
    params = {k: v for k, v in params.items() if k != RECIPE}  # a description, not a weight
    local = network.state_dict()
    missing, extra = sorted(set(local) - set(params)), sorted(set(params) - set(local))
    if missing or extra:
        raise IncompatibleCheckpointError(f"{source} does not fit this network: missing {missing}, extra {extra}")
    shapes = [
        f"{k}: {_shape(params[k])} from the server, {tuple(v.shape)} here"
        for k, v in local.items()
        if _shape(params[k]) != tuple(v.shape)
    ]
    if shapes:
        raise IncompatibleCheckpointError(f"{source} has weights of another shape: " + "; ".join(shapes))
    fitted = {}
    for key, mine in local.items():
        value = torch.as_tensor(params[key]).detach().cpu()
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise IncompatibleCheckpointError(f"{source}: {key} holds NaN or inf")
        # the server's mean of the meta's bytes may come back as floats: the same bytes
        fitted[key] = value.round().to(mine.dtype) if not mine.is_floating_point() else value.to(mine.dtype)
    return fitted


def tensor_bytes(params: Mapping[str, Any]) -> int:
    """What ``params`` weigh on the wire, tensors' data only."""
    return sum(torch.as_tensor(v).numel() * torch.as_tensor(v).element_size() for v in params.values())


def digest(params: Mapping[str, Any]) -> str:
    """A short hash of the prompt tokens: what a site received matched with what the server sent."""
    h = hashlib.sha256()
    for key in sorted(params):
        if key.endswith(".tokens"):
            h.update(torch.as_tensor(params[key]).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(dict(record)) + "\n")
