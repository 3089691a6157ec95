"""Running the 2D network over 2D images and over volumes cut into slices."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import Inferer


class SliceBatchInferer(Inferer):
    """Calls a 2D network on (B, C, S, S) images as they are, and on stacks of slices
    (B, C, n, S, S) — what ``SamInputd`` makes of a volume — ``batch_size`` slices at a time,
    returning (B, K, n, S, S) in slice order."""

    def __init__(self, batch_size: int = 8):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if inputs.ndim == 4:
            return network(inputs, *args, **kwargs)
        if inputs.ndim != 5:
            raise ValueError(f"expected (B, C, S, S) images or (B, C, n, S, S) slice stacks, got {tuple(inputs.shape)}")
        B, C, n = inputs.shape[:3]
        slices = torch.as_tensor(inputs).transpose(1, 2).reshape(B * n, C, *inputs.shape[-2:])
        outputs = [network(chunk, *args, **kwargs) for chunk in slices.split(self.batch_size)]
        out = torch.cat(outputs)  # B * n, K, S, S
        return out.reshape(B, n, *out.shape[1:]).transpose(1, 2)
