"""Resuming an interrupted training: the whole training state, saved after every epoch.

``TrainingState`` writes network, optimiser, scheduler and trainer state (with what the
handlers keep in it: the best score so far, early stopping's count) atomically after every
epoch; when the same command runs again after an interruption, even a SIGKILL mid-epoch, it
loads that file at start and training continues from the last saved epoch. A training that
stopped early stays stopped. Before any work, ``claim`` takes the checkpoint folder for this
training (a second one started into it refuses) and ``check_state`` proves the file to resume
from can be read.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..common.files import atomic_torch_save, lock_folder
from ..common.flags import flag
from .distributed import rank, unwrap

logger = logging.getLogger(__name__)


def read_state(path: str | Path) -> dict[str, Any]:
    """The saved state, weights only; an unreadable file is named with what to do (never torch's
    advice to load it with ``weights_only=False``, which would run whatever code it holds)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, AttributeError) as err:
        unsafe = isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err)
        reason = "it holds Python objects, not only tensors" if unsafe else "truncated or not a PyTorch file"
        raise ValueError(
            f"{path}: cannot resume from this training state ({reason}). Start over with `--resume false` "
            "(the file is then replaced), or move it away to keep it."
        ) from None


def check_state(path: str | Path, resume: Any = True) -> None:
    """Before any work: the state a training would resume from can be read (see ``read_state``)."""
    if flag(resume) and Path(path).is_file():
        read_state(path)


def claim(ckpt_dir: str | Path) -> None:
    """Take ``ckpt_dir`` for this training until it ends (rank 0 of a distributed one): a second
    training started into it would overwrite its model.pt and resume state, so it refuses."""
    if rank() == 0:
        lock_folder(ckpt_dir, "a training")


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
        state = read_state(self.path)
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
