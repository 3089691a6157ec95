"""Peak bytes of tensor storage alive, counted by torch's own dispatcher: what a design controls,
whatever the allocator or its caching (a process's peak RSS is the second figure)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Inside ``with LiveTensorBytes() as live:``, every storage an operator creates is counted
    from its creation until it is freed (forward, backward and recomputation alike); ``peak``
    is the most bytes alive at once. Tensors made before the block (weights, inputs) are not
    counted: the figure is the growth a step causes."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, int] = {}  # storage address -> bytes
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        address, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or address in self.alive:  # views and in-place results share a storage
            return
        self.alive[address] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        # torch keeps one Python object per storage while it lives: its end is the storage's.
        weakref.finalize(storage, self._freed, address)

    def _freed(self, address: int) -> None:
        self.now -= self.alive.pop(address, 0)
