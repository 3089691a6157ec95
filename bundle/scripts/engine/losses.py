"""The training loss: every class is its own sigmoid, scored by Dice and binary cross-entropy.

PTSAM predicts one logit map per class with no background channel, and classes may overlap,
so each channel is a binary problem. (MONAI's ``DiceCELoss(sigmoid=True)`` computes its
cross-entropy as a softmax over the channels once there are two or more: with no background
channel that term is zero on background pixels, and only Dice would keep false positives down.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss


class DiceBCELoss(nn.Module):
    """``dice_weight`` x soft Dice (per image and class, averaged) + ``bce_weight`` x binary
    cross-entropy (per pixel and class, averaged) on (B, C, H, W) logits and 0/1 targets."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, include_background=True, smooth_nr=smooth, smooth_dr=smooth)
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * bce
