"""The only trained parameters of PTSAM: learned prompt tokens."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class PromptTokens(nn.Module):
    """A (groups, n, dim) block of learned tokens.

    With ``n == 0`` the tensor is empty and frozen, so optimisers and DistributedDataParallel
    see no unused trainable parameter.
    """

    def __init__(self, groups: int, n: int, dim: int, init_std: float):
        super().__init__()
        if groups < 1 or n < 0:
            raise ValueError(f"prompt tokens need groups >= 1 and n >= 0, got groups={groups}, n={n}")
        self.tokens = nn.Parameter(torch.randn(groups, n, dim) * init_std, requires_grad=n > 0)

    @property
    def n(self) -> int:
        return self.tokens.shape[1]

    def extra_repr(self) -> str:
        groups, n, dim = self.tokens.shape
        return f"groups={groups}, n={n}, dim={dim}"


class MaskDecoderPrompts(PromptTokens):
    """``n`` tokens of the decoder width per class, in place of SAM's sparse prompt embeddings.

    Drawn from N(0, 1): the scale of the point embeddings SAM's decoder was trained to follow.
    """

    def __init__(self, num_classes: int, n: int, dim: int = 256):
        super().__init__(num_classes, n, dim, init_std=1.0)


class ImageEncoderPrompts(PromptTokens):
    """``n`` tokens of the encoder width for each ViT block (VPT-deep), shared by all classes.

    Drawn with the spread of VPT's uniform initialisation for a 16 x 16 patch embedding.
    """

    def __init__(self, depth: int, n: int, dim: int):
        super().__init__(depth, n, dim, init_std=math.sqrt(6.0 / (3 * 16 * 16 + dim)) / math.sqrt(3.0))


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """What an optimiser should update: the prompt tokens (works through DistributedDataParallel)."""
    return [p for p in network.parameters() if p.requires_grad]
