"""The best prompts as ``models/model.pt``, and the whole training state for resuming.

``BestPromptSaver`` (a training handler after validation) writes the prompt-only checkpoint
whenever the key validation metric improves, or at the end when there was nothing to validate
on. ``TrainingState`` (a training handler, attached last) attaches the best-prompt saver and
early stopping, then writes network, optimiser, scheduler, trainer, best-model and
early-stopping state after every epoch, atomically; when the same command runs again after an
interruption, even a SIGKILL mid-epoch, it loads that file at start and training continues
from the last saved epoch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..checkpoint import atomic_torch_save, load_prompts, save_prompts
from ..flags import flag
from .distributed import rank

logger = logging.getLogger(__name__)


def unwrap(network: Any) -> Any:
    """The network inside DistributedDataParallel / DataParallel; anything else as it is."""
    return getattr(network, "module", network)


def validated_now(trainer: Engine, evaluator: Engine) -> bool:
    """Whether the evaluator has just validated this training epoch."""
    return evaluator.state.epoch == trainer.state.epoch and bool(evaluator.state.metrics)


class BestPromptSaver:
    """Attached to the trainer after its ``ValidationHandler``: writes the prompts to
    ``model_path`` whenever the evaluator's ``metric_name`` improves. With no validation images
    (MONAI Label trains on as few as one), the final prompts are written when training ends."""

    def __init__(
        self,
        network: torch.nn.Module,
        model_path: str | Path,
        evaluator: Engine,
        metric_name: str = "val_mean_dice",
    ):
        self.network, self.model_path = network, Path(model_path)
        self.evaluator, self.metric_name = evaluator, metric_name
        self.best, self.best_epoch = -math.inf, 0

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)
        trainer.add_event_handler(Events.COMPLETED, self.save_unvalidated)

    def save_unvalidated(self, trainer: Engine) -> None:
        if self.best_epoch == 0 and rank() == 0:
            save_prompts(unwrap(self.network), self.model_path)
            logger.warning("no validation ran: the final prompts are saved to %s", self.model_path)

    def __call__(self, trainer: Engine) -> None:
        if not validated_now(trainer, self.evaluator):
            return
        value = float(self.evaluator.state.metrics[self.metric_name])
        if value > self.best:
            self.best, self.best_epoch = value, int(trainer.state.epoch)
            if rank() == 0:
                save_prompts(unwrap(self.network), self.model_path)
                logger.info("new best %s %.4f: prompts saved to %s", self.metric_name, value, self.model_path)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])


class TrainingState:
    """Resume bookkeeping, attached last among the training handlers. It attaches ``best_saver``
    and ``early_stop`` first, so that the state it saves holds their decisions of the epoch
    (and so that ``train#handlers`` lists only handler definitions, as MONAI Label requires)."""

    def __init__(
        self,
        path: str | Path,
        objects: dict[str, Any],
        resume: bool = True,
        best_saver: BestPromptSaver | None = None,
        early_stop: Any = None,
    ):
        self.path, self.objects, self.resume = Path(path), objects, flag(resume)
        self.handlers = [h for h in (best_saver, early_stop) if h is not None]

    def attach(self, trainer: Engine) -> None:
        for handler in self.handlers:
            handler.attach(trainer)
        trainer.add_event_handler(Events.STARTED, self.load)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, trainer: Engine) -> None:
        if rank() != 0:
            return
        state = {name: unwrap(obj).state_dict() for name, obj in self.objects.items()}
        state["trainer"] = trainer.state_dict()
        state["epoch"] = trainer.state.epoch  # for people and tests; ignite resumes from "trainer"
        state["torch_rng"] = torch.get_rng_state()
        atomic_torch_save(state, self.path)

    def load(self, trainer: Engine) -> None:
        if not self.resume or not self.path.is_file():
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for name, obj in self.objects.items():
            unwrap(obj).load_state_dict(state[name])
        max_epochs = trainer.state.max_epochs
        trainer.load_state_dict({**state["trainer"], "max_epochs": max(max_epochs, state["epoch"])})
        torch.set_rng_state(state["torch_rng"])
        if any(getattr(handler, "stopped", False) for handler in self.handlers):
            message = "%s: this training stopped early at epoch %d; `--resume false` starts over"
            logger.info(message, self.path, state["epoch"])
            trainer.terminate()
            return
        logger.info("resumed from %s: epoch %d of %d done", self.path, trainer.state.epoch, max_epochs)


class LoadPrompts:
    """Evaluation and inference: load the trained prompts before the first image, or stop
    with a message saying how to get them."""

    def __init__(self, network: torch.nn.Module, model_path: str | Path):
        self.network, self.model_path = network, Path(model_path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"no trained prompts at {self.model_path}: train first "
                "(python -m monai.bundle run training --config_file configs/train.yaml ...) "
                "or point `model_path` at a model.pt"
            )
        load_prompts(unwrap(self.network), self.model_path)
        logger.info("prompts loaded from %s", self.model_path)
