"""Resuming an interrupted training: the whole training state, saved after every epoch.

``TrainingState`` writes network, optimiser, scheduler and trainer state (with what the
handlers keep in it: the best score so far, early stopping's count), and every random state
the training draws from (torch's, numpy's, Python's and each random transform's, so the slices,
crops and flips after a resume are those an uninterrupted run draws; under torchrun every rank
goes on from rank 0's), atomically after every epoch; when the same command runs again after an
interruption, even a SIGKILL mid-epoch, it loads that file at start and training continues from
the last saved epoch. A training that stopped early stays stopped.

The state records the training's identity (``training_identity`` in train.yaml: the recipe,
the training and validation cases by content, the backbone, prompts, optimisation and seed); a state
recorded with another one is refused, naming what differs, so that a new training into the same
``ckpt_dir`` never continues (or silently skips) an old one. ``epochs`` and
``early_stop_patience`` may change: a training goes on to the new number of epochs, its
learning-rate schedule then stretched or shrunk to it from the step reached.

Before any work, ``check_state`` proves the file to resume from can be read and is this
training's, and ``claim`` takes the checkpoint folder for this training (a second one started
into it refuses).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, Randomizable

from ..common.files import atomic_torch_save, lock_folder
from ..common.flags import flag
from .distributed import rank, unwrap
from .recipe import ADDED
from .splits import image_id

logger = logging.getLogger(__name__)

# A scheduler's progress; the rest of its state (warm-up, horizon) follows the current config.
_PROGRESS = ("last_epoch", "_step_count", "_is_initial", "_get_lr_called_within_step", "_last_lr")


class ResumeMismatchError(ValueError):
    """A training state recorded by another training than this one."""


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


def check_state(path: str | Path, resume: Any = True, identity: Mapping[str, Any] | None = None) -> None:
    """Before any work: the state a training would resume from can be read (see ``read_state``)
    and was recorded by this training (``identity``; see ``check_identity``)."""
    if flag(resume) and Path(path).is_file():
        state = read_state(path)
        if identity is not None:
            check_identity(path, state, identity)


def claim(ckpt_dir: str | Path) -> None:
    """Take ``ckpt_dir`` for this training until it ends (rank 0 of a distributed one): a second
    training started into it would overwrite its model.pt and resume state, so it refuses."""
    if rank() == 0:
        lock_folder(ckpt_dir, "a training")


# The training's identity.

_BY_CONTENT = "content:"  # how a case's digest starts: older bundles' covered part of each file only


def describe_cases(cases: Sequence[Mapping[str, Any]]) -> list[str]:
    """A datalist as the identity records it: each case's image and label by file name, with a
    digest of their content as the split record identifies it (``splits.image_id``: a file's
    whole bytes, a DICOM series' SeriesInstanceUID; read once per process). The dataset may move;
    other files under the same names, or a file changed anywhere in it, are another training."""
    described = []
    for case in cases:
        paths = [str(case[k]) for k in ("image", "label") if k in case]
        ids = [image_id(path) or "" for path in paths]  # unreadable: the dataset check names it
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
        described.append(" + ".join(Path(p).name for p in paths) + f" @ {_BY_CONTENT}{digest}")
    return described


def _by_part(cases: Any) -> bool:
    """Cases an older bundle recorded, by a digest of part of each file only."""
    return isinstance(cases, list) and any(not d.startswith(_BY_CONTENT) for d in _case_names(cases).values())


def _case_names(cases: Sequence[str]) -> dict[str, str]:
    return dict(c.rsplit(" @ ", 1) if " @ " in c else (c, "") for c in cases)


def _plain(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity as JSON has it, one level flat (the recipe's knobs each by name)."""
    flat: dict[str, Any] = {}
    for key, value in identity.items():
        flat.update(dict(value) if isinstance(value, Mapping) else {key: value})
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def _few(cases: Sequence[str], n: int = 3) -> str:
    images = [c.split(" + ")[0] for c in cases]  # a case by its image's name
    return ", ".join(images[:n]) + (", ..." if len(images) > n else "")


def _difference(key: str, was: Any, now: Any) -> str:
    if key.endswith("_cases") and isinstance(was, list) and isinstance(now, list):
        before, after = _case_names(was), _case_names(now)
        new, gone = [c for c in after if c not in before], [c for c in before if c not in after]
        changed = [c for c in after if c in before and after[c] != before[c]]
        parts = [f"{len(changed)} changed ({_few(changed)})"] if changed else []
        parts += [f"{len(new)} new ({_few(new)})"] if new else []
        parts += [f"{len(gone)} no longer there ({_few(gone)})"] if gone else []
        return f"{key.replace('_', ' ')}: " + ("; ".join(parts) or "the same cases in another order")
    return f"--{key} {was!r} (now {now!r})"


def check_identity(path: str | Path, state: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Refuse ``state`` unless it was recorded by the training ``identity`` describes."""
    path = Path(path)
    advice = (
        f"{path} holds the state of another training than this one; start over with `--resume false` "
        f"(it is then replaced, and {path.parent / 'model.pt'} with it), or train into another ckpt_dir"
    )
    if "identity" not in state:
        raise ResumeMismatchError(f"{advice}. It records no identity (an older bundle wrote it).")
    was, now = json.loads(state["identity"]), _plain(identity)
    if any(_by_part(v) for k, v in was.items() if k.endswith("_cases")):
        raise ResumeMismatchError(
            f"{advice}. An older bundle wrote it, identifying each image and label by part of its bytes "
            "only: whether it trained on this data cannot be checked."
        )
    if "intensity" in was:  # a recipe recorded before knobs were added: what it saw (as model.pt's)
        was = {**ADDED, **was}
    found = [_difference(k, was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if found:
        raise ResumeMismatchError(f"{advice}. It differs in:\n  " + "\n  ".join(found))


# Random states: everything a training draws from between two epochs.


def randomizables(transform: Any) -> Iterator[Randomizable]:
    """Every random transform in ``transform`` (a ``Compose`` and its nested ones), in order."""
    if isinstance(transform, Randomizable):
        yield transform
    if isinstance(transform, Compose):
        for inner in transform.transforms:
            yield from randomizables(inner)


def _numpy_state(rng: np.random.RandomState) -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = rng.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _set_numpy_state(rng: np.random.RandomState, state: Mapping[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    rng.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["gauss"]))


def random_states(transforms: Any = None) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(np.random.mtrand._rand),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "transforms": [_numpy_state(t.R) for t in randomizables(transforms)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: Mapping[str, Any], transforms: Any = None) -> None:
    torch.set_rng_state(states["torch"])
    _set_numpy_state(np.random.mtrand._rand, states["numpy"])
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    found = list(randomizables(transforms))
    if len(found) == len(states["transforms"]):
        for transform, state in zip(found, states["transforms"], strict=True):
            _set_numpy_state(transform.R, state)
    else:
        logger.warning("the training's random transforms changed: they go on from fresh random states")
    if "cuda" in states and torch.cuda.is_available() and torch.cuda.device_count() == len(states["cuda"]):
        torch.cuda.set_rng_state_all(states["cuda"])


# The learning-rate schedule.


def load_schedule(scheduler: Any, saved: Mapping[str, Any]) -> list[str]:
    """Load a scheduler's saved progress. Where the rest of its state (the horizon: ``epochs``
    changed) differs from the current config's, the config's is kept and the learning rate set to
    the new schedule's at the step reached; returns those keys."""
    fresh = scheduler.state_dict()
    changed = [k for k in fresh if k not in _PROGRESS and k in saved and saved[k] != fresh[k]]
    if not changed:
        scheduler.load_state_dict(dict(saved))
        return []
    scheduler.load_state_dict({**fresh, **{k: saved[k] for k in _PROGRESS if k in saved}})
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    elif closed_form is not None:
        lrs = closed_form()
    else:
        logger.warning("%s: the learning rate goes on from its saved value", type(scheduler).__name__)
        return changed
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    return changed


class TrainingState:
    """Saves ``objects`` (name -> anything with ``state_dict``), the trainer's state, ``identity``
    and the random states (``transforms``: the training's preprocessing) to ``path`` after every
    epoch, and loads them at start when ``resume`` is on and the file exists."""

    every_rank = True  # every rank loads; rank 0 writes

    def __init__(
        self,
        path: str | Path,
        objects: Mapping[str, Any],
        resume: bool = True,
        identity: Mapping[str, Any] | None = None,
        transforms: Any = None,
    ):
        self.path, self.objects, self.resume = Path(path), dict(objects), flag(resume)
        self.identity, self.transforms = identity, transforms

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
        state["random"] = random_states(self.transforms)
        if self.identity is not None:
            state["identity"] = json.dumps(_plain(self.identity), sort_keys=True)
        atomic_torch_save(state, self.path)
        trainer.state.saved_epoch = trainer.state.epoch  # MLflow's metrics of an epoch wait for this

    def load(self, trainer: Engine) -> None:
        # Only a fresh trainer resumes: one that runs again in the same process (MONAI FL's
        # rounds) goes on from what it holds, the global weights just copied in.
        trainer.state.saved_epoch = trainer.state.epoch
        if not self.resume or not self.path.is_file() or trainer.state.iteration > 0:
            return
        state = read_state(self.path)
        if self.identity is not None:
            check_identity(self.path, state, self.identity)
        schedules = {n: o for n, o in self.objects.items() if isinstance(o, torch.optim.lr_scheduler.LRScheduler)}
        for name, obj in self.objects.items():
            if name not in schedules:
                unwrap(obj).load_state_dict(state[name])
        for name, scheduler in schedules.items():  # after the optimiser: it may set the learning rate
            if load_schedule(scheduler, state[name]):
                message = "%s: --epochs %d (was %d): the learning-rate schedule now ends at epoch %d"
                was = state["trainer"]["max_epochs"]
                logger.info(message, self.path, trainer.state.max_epochs, was, trainer.state.max_epochs)
        max_epochs = trainer.state.max_epochs
        kept = {key: getattr(trainer.state, key) for key in trainer.state_dict_user_keys}
        trainer.load_state_dict({**kept, **state["trainer"], "max_epochs": max(max_epochs, state["epoch"])})
        trainer.state.saved_epoch = trainer.state.epoch
        if "random" in state:
            set_random_states(state["random"], self.transforms)
        if getattr(trainer.state, "stopped_early", False):
            message = "%s: this training stopped early at epoch %d; `--resume false` starts over"
            logger.info(message, self.path, state["epoch"])
            trainer.terminate()
            return
        logger.info("resumed from %s: epoch %d of %d done", self.path, trainer.state.epoch, max_epochs)
        if trainer.state.epoch >= max_epochs:
            logger.info("nothing left to train: a larger `--epochs` goes on, `--resume false` starts over")
