"""Running the 2D network over 2D images and over volumes cut into slices."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import Inferer, SlidingWindowInferer


class SliceBatchInferer(Inferer):
    """Calls a 2D network on (B, C, H, W) images as they are, and on stacks of slices
    (B, C, n, H, W) — what ``SamInputd`` makes of a volume — ``batch_size`` slices at a time,
    returning (B, K, n, H, W) in slice order. ``inner`` (e.g. a sliding-window inferer for
    native-scale images) runs the network on each batch of 2D images; by default it is called
    directly."""

    def __init__(self, batch_size: int = 8, inner: Inferer | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.inner = inner

    def _run(self, images: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if self.inner is None:
            return network(images, *args, **kwargs)
        return self.inner(images, network, *args, **kwargs)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if inputs.ndim == 4:
            return self._run(inputs, network, *args, **kwargs)
        if inputs.ndim != 5:
            raise ValueError(f"expected (B, C, S, S) images or (B, C, n, S, S) slice stacks, got {tuple(inputs.shape)}")
        B, C, n = inputs.shape[:3]
        slices = torch.as_tensor(inputs).transpose(1, 2).reshape(B * n, C, *inputs.shape[-2:])
        outputs = [self._run(chunk, network, *args, **kwargs) for chunk in slices.split(self.batch_size)]
        out = torch.cat(outputs)  # B * n, K, S, S
        return out.reshape(B, n, *out.shape[1:]).transpose(1, 2)


def make_inferer(
    scale: str = "resize", image_size: int = 1024, batch_size: int = 8, overlap: float = 0.25, blend: str = "gaussian"
) -> SliceBatchInferer:
    """``resize``: every image or slice resized to the network's input as a whole.
    ``native``: images kept at their size and covered by overlapping network-sized tiles
    (MONAI's ``SlidingWindowInferer``; ``overlap`` and ``blend`` 'gaussian' or 'constant')."""
    if scale == "resize":
        return SliceBatchInferer(batch_size)
    if scale != "native":
        raise ValueError(f"scale must be 'resize' or 'native', got {scale!r}")
    roi = (image_size, image_size)
    window = SlidingWindowInferer(roi_size=roi, sw_batch_size=batch_size, overlap=overlap, mode=blend)
    return SliceBatchInferer(batch_size=1, inner=window)
