"""Handlers the workflow configs list: the best prompts as ``model.pt``, early stopping, a
summary per epoch, and the prompt loader of evaluation and inference.

A training handler that acts on validation results is attached to the trainer and listens to
the evaluator's ``COMPLETED`` event (Ignite's idiom): it sees each validation once, with its
metrics, wherever it stands in ``train#handlers``. What such a handler must remember across an
interrupted training lives in the trainer's state (``state_dict_user_keys``), which
``scripts.engine.resume.TrainingState`` saves and restores with the rest. In a distributed
training, handlers marked ``every_rank = True`` run on every process; the others on rank 0 only
(``scripts.engine.distributed.rank_zero_only``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..model.prompt_file import load_prompts, save_prompts
from .distributed import unwrap

logger = logging.getLogger(__name__)


def on_validation(trainer: Engine, evaluator: Engine, handler: Any) -> None:
    """Call ``handler(trainer, metrics)`` whenever ``evaluator`` completes a validation."""
    evaluator.add_event_handler(Events.COMPLETED, lambda e: handler(trainer, e.state.metrics))


def remembered(trainer: Engine, **defaults: Any) -> None:
    """Keep these trainer-state attributes in its ``state_dict`` (saved for resuming)."""
    for key, value in defaults.items():
        setattr(trainer.state, key, value)
        if key not in trainer.state_dict_user_keys:
            trainer.state_dict_user_keys.append(key)


class BestPromptSaver:
    """Writes the prompts, with the training's ``recipe`` (``scripts.engine.recipe``) and
    ``split`` (``scripts.engine.splits``), to ``model_path`` whenever the evaluator's
    ``metric_name`` improves. With no validation images (MONAI Label trains on as few as one),
    the final prompts are written when training ends."""

    def __init__(
        self,
        network: torch.nn.Module,
        model_path: str | Path,
        evaluator: Engine,
        recipe: Mapping[str, Any] | None = None,
        metric_name: str = "val_mean_dice",
        split: Mapping[str, Any] | None = None,
    ):
        self.network, self.model_path, self.recipe, self.split = network, Path(model_path), recipe, split
        self.evaluator, self.metric_name = evaluator, metric_name

    def attach(self, trainer: Engine) -> None:
        remembered(trainer, best_prompts_metric=-math.inf, best_prompts_epoch=0)
        on_validation(trainer, self.evaluator, self.validated)
        trainer.add_event_handler(Events.COMPLETED, self.save_unvalidated)

    def validated(self, trainer: Engine, metrics: Mapping[str, Any]) -> None:
        value = float(metrics[self.metric_name])
        if value > trainer.state.best_prompts_metric:
            trainer.state.best_prompts_metric, trainer.state.best_prompts_epoch = value, int(trainer.state.epoch)
            save_prompts(unwrap(self.network), self.model_path, self.recipe, self.split)
            logger.info("new best %s %.4f: prompts saved to %s", self.metric_name, value, self.model_path)

    def save_unvalidated(self, trainer: Engine) -> None:
        if trainer.state.best_prompts_epoch == 0:
            save_prompts(unwrap(self.network), self.model_path, self.recipe, self.split)
            logger.warning("no validation ran: the final prompts are saved to %s", self.model_path)


class EarlyStopping:
    """Stops training when the evaluator's metric has not improved by ``min_delta`` for
    ``patience`` validations (the few-shot guard); ``patience <= 0`` disables it. Every rank
    stops together, so it runs on all of them."""

    every_rank = True

    def __init__(
        self, evaluator: Engine, patience: int = 10, metric_name: str = "val_mean_dice", min_delta: float = 0.0
    ):
        self.evaluator, self.patience, self.metric_name, self.min_delta = evaluator, patience, metric_name, min_delta

    def attach(self, trainer: Engine) -> None:
        remembered(trainer, early_stop_best=-math.inf, early_stop_counter=0, stopped_early=False)
        on_validation(trainer, self.evaluator, self.validated)

    def validated(self, trainer: Engine, metrics: Mapping[str, Any]) -> None:
        if self.patience <= 0:
            return
        value = float(metrics[self.metric_name])
        state = trainer.state
        if value > state.early_stop_best + self.min_delta:
            state.early_stop_best, state.early_stop_counter = value, 0
            return
        state.early_stop_counter += 1
        if state.early_stop_counter >= self.patience:
            message = "early stopping: %s has not improved on %.4f for %d validations"
            logger.info(message, self.metric_name, state.early_stop_best, state.early_stop_counter)
            state.stopped_early = True
            trainer.terminate()


class EpochSummary:
    """One line per epoch (mean training loss, the learning rates its steps used, time) and one
    per validation."""

    def __init__(self, evaluator: Engine | None = None, optimizer: Any = None):
        self.evaluator, self.optimizer = evaluator, optimizer
        self.losses: list[float] = []
        self.rates: list[float] = []
        self.start = time.time()

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._reset)
        trainer.add_event_handler(Events.ITERATION_STARTED, self._rate)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._report)
        if self.evaluator is not None:
            on_validation(trainer, self.evaluator, self._validated)

    def _reset(self, trainer: Engine) -> None:
        self.losses, self.rates, self.start = [], [], time.time()

    def _rate(self, trainer: Engine) -> None:
        if self.optimizer is not None:  # before the step: the scheduler moves it on when the step completes
            self.rates.append(learning_rate(self.optimizer))

    def _collect(self, trainer: Engine) -> None:
        loss = iteration_loss(trainer)
        if loss is not None:
            self.losses.append(loss)

    def _report(self, trainer: Engine) -> None:
        parts = [f"epoch {trainer.state.epoch}/{trainer.state.max_epochs}"]
        if self.losses:
            parts.append(f"loss {sum(self.losses) / len(self.losses):.4f}")
        if self.rates:
            first, last = self.rates[0], self.rates[-1]
            parts.append(f"lr {first:.2e}" + (f" to {last:.2e}" if last != first else ""))
        parts.append(f"{time.time() - self.start:.1f} s")
        logger.info("  ".join(parts))

    def _validated(self, trainer: Engine, metrics: Mapping[str, Any]) -> None:
        parts = [f"validation after epoch {trainer.state.epoch}/{trainer.state.max_epochs}"]
        parts += [f"{k} {v:.4f}" for k, v in numeric_metrics(metrics).items()]
        logger.info("  ".join(parts))


def require_prompts(model_path: str | Path) -> Path:
    """``model_path``, or a ``FileNotFoundError`` saying how to get trained prompts: what
    evaluation, inference and export say when there are none yet."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained prompts at {path}: train first "
            "(python -m monai.bundle run training --config_file configs/train.yaml ...) "
            "or point `model_path` at a model.pt"
        )
    return path


class LoadPrompts:
    """Evaluation and inference: load the trained prompts before the first image, or stop
    with a message saying how to get them."""

    def __init__(self, network: torch.nn.Module, model_path: str | Path):
        self.network, self.model_path = network, Path(model_path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        load_prompts(unwrap(self.network), require_prompts(self.model_path))
        logger.info("prompts loaded from %s", self.model_path)


def iteration_loss(trainer: Engine) -> float | None:
    """The loss of the trainer's last iteration (MONAI's output: a list of dicts, or a dict)."""
    output = trainer.state.output
    item = output[0] if isinstance(output, list) else output
    return float(item["loss"]) if isinstance(item, Mapping) and "loss" in item else None


def learning_rate(optimizer: Any) -> float:
    """The rate of the optimiser's first parameter group (read before a step: the one it uses)."""
    return float(optimizer.param_groups[0]["lr"])


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are numbers (per-image details and the like are left out)."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out
