"""Distributed training with the standard engine: torchrun + DistributedDataParallel."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPUs)."""
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())


def finish() -> None:
    """Leave the process group together, then end the ranks other than 0 at once.

    A rank that tears down gloo while another still works (rank 0 writes model.pt and the MLflow
    run last) can abort the job, hence the barrier. After it, every result is written; what is
    left is the interpreter's teardown, where the DDP wrapper and gloo's threads are destroyed in
    no fixed order, and rank 1 has been seen to abort there ("terminate called without an active
    exception": twice in CI on 2 CPU cores, never in 50 runs by hand), failing a finished job.
    Ranks other than 0 hold nothing to flush, so they skip that teardown; rank 0 exits normally
    (MLflow flushes at exit).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    rank_zero = dist.get_rank() == 0
    dist.destroy_process_group()
    if not rank_zero:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def unwrap(network: Any) -> Any:
    """The network inside DistributedDataParallel / DataParallel; anything else as it is."""
    return getattr(network, "module", network)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def wrap(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the trainable prompts; the frozen SAM is not synchronised."""
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids, broadcast_buffers=False)


class MeanLoss:
    """Every iteration, the loss averaged over the ranks, in place of this rank's own: each rank
    trains on its share of the step's images, and what rank 0 logs (``train_loss``) and
    summarises is the step's loss, not its share's. Attached first, on every rank."""

    every_rank = True

    def attach(self, trainer: Any) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, trainer: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        output = trainer.state.output
        items = [o for o in (output if isinstance(output, list) else [output]) if isinstance(o, dict) and "loss" in o]
        if not items:
            return
        loss = torch.as_tensor(items[0]["loss"]).detach().float().reshape(1).clone()
        dist.all_reduce(loss)
        for item in items:
            item["loss"] = loss[0] / dist.get_world_size()


def runs_on_every_rank(handler: Any) -> bool:
    """What every rank needs to stay in step: MONAI's learning-rate schedule and validation, and
    this bundle's handlers marked ``every_rank`` (early stopping, the training state)."""
    from monai.handlers import LrScheduleHandler, ValidationHandler

    return isinstance(handler, (LrScheduleHandler, ValidationHandler)) or getattr(handler, "every_rank", False)


def rank_zero_only(handlers: Sequence[Any]) -> list[Any]:
    """All handlers on rank 0; elsewhere only those that ``runs_on_every_rank``."""
    if rank() == 0:
        return list(handlers)
    return [h for h in handlers if runs_on_every_rank(h)]
