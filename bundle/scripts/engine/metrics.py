"""Validation metrics that count every image: an empty prediction on an empty truth is a
Dice of 1, anything predicted on an empty truth a Dice of 0 (no case is left out)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric


def _select(channel: int | None) -> Callable:
    pick = from_engine(["pred", "label"])

    def transform(output):
        preds, labels = pick(output)
        if channel is None:
            return preds, labels
        return [p[channel : channel + 1] for p in preds], [y[channel : channel + 1] for y in labels]

    return transform


def dice(channel: int | None = None) -> IgniteMetricHandler:
    """Mean Dice over images and classes (``channel=None``) or of one class channel."""
    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
    return IgniteMetricHandler(metric_fn=metric, output_transform=_select(channel), save_details=False)


def class_dice(class_names: Sequence[str]) -> dict[str, IgniteMetricHandler]:
    """``val_dice_<name>`` for every class (only when there is more than one)."""
    if len(class_names) < 2:
        return {}
    return {f"val_dice_{name}": dice(c) for c, name in enumerate(class_names)}
