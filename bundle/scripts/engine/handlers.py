"""Small training handlers: early stopping with resumable state, and a one-line epoch summary."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events

from .checkpoints import validated_now

logger = logging.getLogger(__name__)


class EarlyStopping:
    """Attached to the trainer after its ``ValidationHandler``: stops training when the
    evaluator's metric has not improved by ``min_delta`` for ``patience`` validations (the
    few-shot guard); ``patience <= 0`` disables it."""

    def __init__(
        self, evaluator: Engine, patience: int = 10, metric_name: str = "val_mean_dice", min_delta: float = 0.0
    ):
        self.evaluator, self.patience, self.metric_name, self.min_delta = evaluator, patience, metric_name, min_delta
        self.best, self.counter = -math.inf, 0

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        if self.patience <= 0 or not validated_now(trainer, self.evaluator):
            return
        value = float(self.evaluator.state.metrics[self.metric_name])
        if value > self.best + self.min_delta:
            self.best, self.counter = value, 0
            return
        self.counter += 1
        if self.counter >= self.patience:
            message = "early stopping: %s has not improved on %.4f for %d validations"
            logger.info(message, self.metric_name, self.best, self.counter)
            trainer.terminate()

    @property
    def stopped(self) -> bool:
        return 0 < self.patience <= self.counter

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.counter = float(state["best"]), int(state["counter"])


class EpochSummary:
    """One line per epoch: mean training loss, learning rate, validation metrics, time."""

    def __init__(self, evaluator: Engine | None = None, optimizer: Any = None):
        self.evaluator, self.optimizer = evaluator, optimizer
        self.losses: list[float] = []
        self.start = time.time()

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._reset)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, trainer: Engine) -> None:
        self.losses, self.start = [], time.time()

    def _collect(self, trainer: Engine) -> None:
        loss = iteration_loss(trainer)
        if loss is not None:
            self.losses.append(loss)

    def _report(self, trainer: Engine) -> None:
        parts = [f"epoch {trainer.state.epoch}/{trainer.state.max_epochs}"]
        if self.losses:
            parts.append(f"loss {sum(self.losses) / len(self.losses):.4f}")
        if self.optimizer is not None:
            parts.append(f"lr {self.optimizer.param_groups[0]['lr']:.2e}")
        if self.evaluator is not None and validated_now(trainer, self.evaluator):
            parts += [f"{k} {v:.4f}" for k, v in numeric_metrics(self.evaluator.state.metrics).items()]
        parts.append(f"{time.time() - self.start:.1f} s")
        logger.info("  ".join(parts))


def iteration_loss(trainer: Engine) -> float | None:
    """The loss of the trainer's last iteration (MONAI's output: a list of dicts, or a dict)."""
    output = trainer.state.output
    item = output[0] if isinstance(output, list) else output
    return float(item["loss"]) if isinstance(item, Mapping) and "loss" in item else None


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are numbers (per-image details and the like are left out)."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out
