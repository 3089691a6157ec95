"""The training loss treats every class as its own sigmoid: background pixels count in every channel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss, DiceLoss

from helpers import BUNDLE
from scripts.engine.losses import DiceBCELoss


def test_background_counts_in_every_class_channel():
    logits, target = torch.full((1, 2, 8, 8), 5.0), torch.zeros(1, 2, 8, 8)  # confident, all wrong
    two, one = DiceBCELoss()(logits, target), DiceBCELoss()(logits[:, :1], target[:, :1])
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert bce > 5.0 and torch.isclose(two, one) and torch.isclose(two, 1.0 + bce, atol=1e-4)
    # what MONAI's DiceCELoss(sigmoid=True) makes of the same: a softmax cross-entropy that is 0 here
    assert torch.isclose(DiceCELoss(sigmoid=True)(logits, target), torch.tensor(1.0), atol=1e-4)


def test_each_channel_is_scored_as_its_own_binary_problem():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 16, 16, generator=g)
    target = (torch.rand(3, 2, 16, 16, generator=g) > 0.7).float()
    target[:, 1] = torch.maximum(target[:, 1], target[:, 0])  # classes may overlap
    per_class = [DiceBCELoss()(logits[:, c : c + 1], target[:, c : c + 1]) for c in range(2)]
    assert torch.isclose(DiceBCELoss()(logits, target), sum(per_class) / 2, atol=1e-5)
    dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    expected = dice + F.binary_cross_entropy_with_logits(logits, target)
    assert torch.isclose(DiceBCELoss()(logits, target), expected, atol=1e-6)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_the_training_config_uses_it(num_classes):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "num_classes": num_classes})
    assert isinstance(parser.get_parsed_content("loss"), DiceBCELoss)
