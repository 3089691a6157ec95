"""Distributed training with the standard engine: torchrun + DistributedDataParallel."""

from __future__ import annotations

import os
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


def rank_zero_only(handlers: Sequence[Any]) -> list[Any]:
    """All handlers on rank 0; elsewhere only those every rank needs to stay in step (learning-rate
    schedule, validation, and ``TrainingState`` with the early stopping and best-model saving it
    attaches, which write on rank 0 only)."""
    if rank() == 0:
        return list(handlers)
    return [h for h in handlers if type(h).__name__ in _EVERY_RANK]


_EVERY_RANK = {"LrScheduleHandler", "ValidationHandler", "TrainingState"}
