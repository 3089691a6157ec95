"""The server's side of a PTSAM federation: every site update checked, every global model kept.

``PromptUpdateCheck`` (a task-result filter) refuses a site's update whose entries or shapes are
not the global prompts': averaged in, it would fail inside the aggregator or, worse, broadcast.

FLARE's persistor keeps only the latest global model (FL_global_model.pt). This component also
writes ``ptsam_rounds/global_<k>.pt``, the global prompts after k rounds (``global_0.pt``: the
initial ones), and a line per round in ``ptsam_rounds/rounds.jsonl``: which sites the round
averaged, the tensors' names, shapes and bytes. Both lie in the server's app folder.
"""

from __future__ import annotations

import json
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
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.aggregators.weighted_aggregation_helper import AggregationStatsKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType


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
            self._save(fl_ctx, after_rounds=0, contributors=[])
        elif event_type == AppEventType.AFTER_SHAREABLE_TO_LEARNABLE:
            # fired once a round's results are averaged into the global model
            round_ = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            stats = fl_ctx.get_prop(AppConstants.AGGREGATION_STATS) or {}
            self._save(fl_ctx, after_rounds=round_ + 1, contributors=stats.get(AggregationStatsKey.CONTRIBUTORS, []))

    def _save(self, fl_ctx: FLContext, after_rounds: int, contributors: list[str]) -> None:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights: dict[str, Any] = dict(model[ModelLearnableKey.WEIGHTS]) if model else {}
        state = {k: torch.as_tensor(v).detach().cpu().clone() for k, v in weights.items()}
        path = self._dir / f"global_{after_rounds}.pt"
        torch.save(state, path)
        record = {
            "after_rounds": after_rounds,
            "contributors": list(contributors),
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
        expected = {k: tuple(getattr(v, "shape", ())) for k, v in model[ModelLearnableKey.WEIGHTS].items()}
        update = from_shareable(shareable).data or {}
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "a site")
        round_ = shareable.get_header(AppConstants.CURRENT_ROUND)
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        shapes = [
            f"{k}: {tuple(getattr(v, 'shape', ()))} from {site}, {expected[k]} in the global model"
            for k, v in update.items()
            if k in expected and tuple(getattr(v, "shape", ())) != expected[k]
        ]
        if missing or extra or shapes:
            problems = ([f"missing {missing}"] if missing else []) + ([f"extra {extra}"] if extra else []) + shapes
            raise ValueError(f"refused the update of {site} in round {round_}: " + "; ".join(problems))
        self.log_info(fl_ctx, f"the update of {site} in round {round_} fits the global prompts")
        return shareable
