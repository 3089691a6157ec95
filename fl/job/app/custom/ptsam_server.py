"""The server's side of a PTSAM federation: every site update checked, averaged by training
images, every global model kept.

``PromptUpdateCheck`` (a task-result filter) refuses a site's update, before the round averages
anything, whose entries or shapes are not the global prompts' (averaged in, it would fail inside
the aggregator or, worse, broadcast), or that was trained with another recipe than the one the
global model records (``ptsam_recipe``: intensity, classes, layout, image size, ...; prompts
trained on images prepared otherwise average into nonsense), naming the site and each knob, or
that does not say on how many training images it was trained.

``ImageWeightedAggregator`` is FedAvg's average: the new global prompts are the old ones plus the
mean of the sites' changes, each weighted by the number of training images the site learned from
(``sum(n_i * change_i) / sum(n_i)``). FLARE's own FedAvg weighs by the steps a site trained,
which grows with its epochs and shrinks with its batch size rather than with its data. The
descriptions (``ptsam_meta``, ``ptsam_recipe``) are kept from the initial model, never averaged.

FLARE's persistor keeps only the latest global model (FL_global_model.pt). This component also
writes ``ptsam_rounds/global_<k>.pt``, the global prompts after k rounds (``global_0.pt``: the
initial ones), each a prompt file with the federation's recipe, and a line per round in
``ptsam_rounds/rounds.jsonl``: which sites the round averaged with their training images, the
tensors' names, shapes and bytes. Both lie in the server's app folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import AggregationStatsKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from ptsam_site import DESCRIPTIONS, RECIPE, SITE_RECIPE, TRAINING_IMAGES

# The aggregated model's meta: the training images of each site the round averaged.
AVERAGED = "ptsam_training_images_averaged"


def decode_json(value: Any) -> dict[str, Any] | None:
    """The JSON object in a description entry (a uint8 tensor, or its bytes as another dtype)."""
    if value is None:
        return None
    tensor = torch.as_tensor(value).detach().cpu()
    tensor = tensor.round() if tensor.is_floating_point() else tensor
    raw = tensor.to(torch.uint8).numpy().tobytes().rstrip(b"\0")
    try:
        found = json.loads(raw)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def recipe_problems(federation: Mapping[str, Any] | None, meta: Mapping[str, Any], site: str) -> list[str]:
    """What is wrong with the recipe a site's update says it was trained with (``meta``), against
    the federation's (the global model's ``ptsam_recipe``); empty if nothing."""
    if federation is None:
        return [f"the global model records no recipe ({RECIPE}): make the job with fl/prepare.py job"]
    sent = meta.get(SITE_RECIPE)
    try:
        theirs = json.loads(sent) if isinstance(sent, str) else None
    except ValueError:
        theirs = None
    if not isinstance(theirs, dict):
        return [f"{site} does not say which recipe it trained with ({SITE_RECIPE} in its update's meta)"]
    knobs = list(federation) + [k for k in theirs if k not in federation]
    diffs = [
        f"{k}: the federation's {federation.get(k)!r}, {site}'s {theirs.get(k)!r}"
        for k in knobs
        if federation.get(k) != theirs.get(k)
    ]
    return [f"trained with another recipe than the federation's ({'; '.join(diffs)})"] if diffs else []


def images_of(meta: Mapping[str, Any]) -> int | None:
    """The training images a site's update says it learned from; None unless a positive integer."""
    n = meta.get(TRAINING_IMAGES)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


class GlobalPromptRecorder(FLComponent):
    def __init__(self, folder: str = "ptsam_rounds"):
        super().__init__()
        self.folder = folder
        self._dir: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._dir = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / self.folder
            self._dir.mkdir(parents=True, exist_ok=True)
        elif event_type == AppEventType.INITIAL_MODEL_LOADED:
            self._save(fl_ctx, after_rounds=0)
        elif event_type == AppEventType.AFTER_SHAREABLE_TO_LEARNABLE:
            # fired once a round's results are averaged into the global model
            round_ = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            self._save(fl_ctx, after_rounds=round_ + 1)

    def _save(self, fl_ctx: FLContext, after_rounds: int) -> None:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights: dict[str, Any] = dict(model[ModelLearnableKey.WEIGHTS]) if model else {}
        meta = (model.get(ModelLearnableKey.META) or {}) if model else {}
        images = dict(meta.get(AVERAGED) or {})  # {} for the initial model
        stats = fl_ctx.get_prop(AppConstants.AGGREGATION_STATS) or {}  # FLARE's own aggregation's
        contributors = sorted(images) or list(stats.get(AggregationStatsKey.CONTRIBUTORS, []))
        state = {k: torch.as_tensor(v).detach().cpu().clone() for k, v in weights.items()}
        path = self._dir / f"global_{after_rounds}.pt"
        torch.save(state, path)
        record = {
            "after_rounds": after_rounds,
            "contributors": contributors,
            "training_images": images,
            "file": path.name,
            "shapes": {k: list(v.shape) for k, v in state.items()},
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()},
            "bytes": sum(v.numel() * v.element_size() for v in state.values()),
        }
        with (self._dir / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.log_info(fl_ctx, f"global prompts after {after_rounds} round(s): {path} ({record['bytes']} bytes)")


class PromptUpdateCheck(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if not model or shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # a failed task carries no weights: FLARE reports the site's error
        global_weights = model[ModelLearnableKey.WEIGHTS]
        # a site sends back the change of its state dict: everything but the recipe, a description only
        expected = {k: tuple(getattr(v, "shape", ())) for k, v in global_weights.items() if k != RECIPE}
        dxo = from_shareable(shareable)
        update, meta = dxo.data or {}, dxo.meta or {}
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "a site")
        round_ = shareable.get_header(AppConstants.CURRENT_ROUND)
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        shapes = [
            f"{k}: {tuple(getattr(v, 'shape', ()))} from {site}, {expected[k]} in the global model"
            for k, v in update.items()
            if k in expected and tuple(getattr(v, "shape", ())) != expected[k]
        ]
        problems = ([f"missing {missing}"] if missing else []) + ([f"extra {extra}"] if extra else []) + shapes
        problems += recipe_problems(decode_json(global_weights.get(RECIPE)), meta, site)
        if images_of(meta) is None:
            problems.append(f"no positive number of training images ({TRAINING_IMAGES}: {meta.get(TRAINING_IMAGES)!r})")
        if problems:
            raise ValueError(f"refused the update of {site} in round {round_}: " + "; ".join(problems))
        self.log_info(fl_ctx, f"the update of {site} in round {round_} fits the global prompts and recipe")
        return shareable


class ImageWeightedAggregator(ModelAggregator):
    """The mean of the sites' prompt changes, each weighted by its training images (see the module
    docstring); FedAvg adds it to the global prompts. The sums are kept in float64."""

    def __init__(self):
        super().__init__()
        self.reset_stats()

    def reset_stats(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._images: dict[str, int] = {}

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = str(meta.get("client_name", "a site"))
        images = images_of(meta)
        if images is None:  # PromptUpdateCheck refuses such an update before it gets here
            raise ValueError(f"the update of {site} does not say on how many training images it trained")
        if model.params_type != ParamsType.DIFF:
            raise ValueError(f"the update of {site} is {model.params_type}, not the change of the prompts")
        if site in self._images:
            raise ValueError(f"a second update of {site} in one round")
        for key, value in model.params.items():
            if key in DESCRIPTIONS:
                continue
            tensor = torch.as_tensor(value).detach().cpu()
            self._dtypes.setdefault(key, tensor.dtype)
            weighted = tensor.double() * images
            self._sums[key] = self._sums[key] + weighted if key in self._sums else weighted
        self._images[site] = images

    def aggregate_model(self) -> FLModel:
        if not self._images:
            raise ValueError("no site update to average in this round")
        total = sum(self._images.values())
        params = {k: (v / total).to(self._dtypes[k]) for k, v in self._sums.items()}
        averaged = {AVERAGED: dict(sorted(self._images.items()))}
        self.reset_stats()
        return FLModel(params=params, params_type=ParamsType.DIFF, meta=averaged)
