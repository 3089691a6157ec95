"""Resuming an interrupted training: the whole training state, saved after every epoch.

``TrainingState`` writes network, optimiser, scheduler and trainer state (with what the
handlers keep in it: the best score so far, early stopping's count) atomically after every
epoch; when the same command runs again after an interruption, even a SIGKILL mid-epoch, it
loads that file at start and training continues from the last saved epoch. A training that
stopped early stays stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..common.files import atomic_torch_save
from ..common.flags import flag
from .distributed import rank, unwrap

logger = logging.getLogger(__name__)


class TrainingState:
    """Saves ``objects`` (name -> anything with ``state_dict``) and the trainer's state to ``path``
    after every epoch, and loads them at start when ``resume`` is on and the file exists."""

    every_rank = True  # every rank loads; rank 0 writes

    def __init__(self, path: str | Path, objects: dict[str, Any], resume: bool = True):
        self.path, self.objects, self.resume = Path(path), objects, flag(resume)

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self.load)
        # Registered once the run starts, the save follows every epoch-end handler attached
        # before it (validation, the best-prompt saver, early stopping): it holds their decisions.
        trainer.add_event_handler(Events.STARTED, lambda t: t.add_event_handler(Events.EPOCH_COMPLETED, self.save))

    def save(self, trainer: Engine) -> None:
        if rank() != 0:
            return
        state = {name: unwrap(obj).state_dict() for name, obj in self.objects.items()}
        state["trainer"] = trainer.state_dict()
        state["epoch"] = trainer.state.epoch  # for people and tests; ignite resumes from "trainer"
        state["torch_rng"] = torch.get_rng_state()
        atomic_torch_save(state, self.path)

    def load(self, trainer: Engine) -> None:
        # Only a fresh trainer resumes: one that runs again in the same process (MONAI FL's
        # rounds) goes on from what it holds, the global weights just copied in.
        if not self.resume or not self.path.is_file() or trainer.state.iteration > 0:
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for name, obj in self.objects.items():
            unwrap(obj).load_state_dict(state[name])
        max_epochs = trainer.state.max_epochs
        kept = {key: getattr(trainer.state, key) for key in trainer.state_dict_user_keys}
        trainer.load_state_dict({**kept, **state["trainer"], "max_epochs": max(max_epochs, state["epoch"])})
        torch.set_rng_state(state["torch_rng"])
        if getattr(trainer.state, "stopped_early", False):
            message = "%s: this training stopped early at epoch %d; `--resume false` starts over"
            logger.info(message, self.path, state["epoch"])
            trainer.terminate()
            return
        logger.info("resumed from %s: epoch %d of %d done", self.path, trainer.state.epoch, max_epochs)
