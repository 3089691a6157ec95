"""Evaluation report: Dice, IoU and 95 % Hausdorff distance per image and class, a CSV, a
summary on screen, and overlay pictures of image, truth and prediction.

Every image and class counts. An empty prediction on an empty truth scores Dice = IoU = 1;
a prediction on an empty truth, or none on a non-empty one, scores 0. The Hausdorff distance
is undefined when either side is empty: such rows hold ``nan`` there, are left out of its
mean only, and are counted in the summary. Distances are in mm where the image has a
geometry (NIfTI, DICOM), in pixels otherwise.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_hausdorff_distance
from PIL import Image
from scipy import ndimage

from ..common.files import atomic_write
from ..data.io import read_image
from ..data.io.formats import output_stem
from ..data.meta import meta_int

logger = logging.getLogger(__name__)

FIELDS = ("image", "split", "class", "dice", "iou", "hd95", "truth_voxels", "pred_voxels")
SPLITS = {
    "test": "held-out test images (they neither trained nor chose the prompts)",
    "validation": "validation images (they chose the best epoch: an optimistic score)",
    "training": "training images (what the prompts were fitted to: not a measure of generalisation)",
}


def overlap_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two binary masks; both empty scores 1."""
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / (total - inter)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None) -> float:
    if not pred.any() or not truth.any():
        return math.nan
    distance = compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None].float(),
        torch.from_numpy(truth)[None, None].float(),
        percentile=95,
        spacing=list(spacing) if spacing is not None else None,
    )
    return float(distance.reshape(-1)[0])


def _spacing(meta: dict, ndim: int) -> list[float] | None:
    if meta.get("format") not in ("nifti", "dicom"):
        return None
    affine = torch.as_tensor(meta["affine"]).reshape(4, 4).double().cpu().numpy()
    return np.linalg.norm(affine[:3, :ndim], axis=0).tolist()


def _display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) uint8, stretched between the 1st and 99th percentiles."""
    lo, hi = np.percentile(image, [1, 99])
    scaled = np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1e-9), 0, 1) * 255
    rgb = scaled[:3] if scaled.shape[0] >= 3 else np.repeat(scaled[:1], 3, axis=0)
    return np.moveaxis(rgb, 0, -1).astype(np.uint8)


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Image with the truth's outline in green and the prediction's in red (2D inputs)."""
    rgb = _display(image)
    for mask, colour in ((truth, (0, 255, 0)), (pred, (255, 0, 0))):
        outline = mask & ~ndimage.binary_erosion(mask)
        rgb[outline] = colour
    return rgb


class EvaluationReport:
    """Attach to an evaluator whose output holds per-class binary ``pred`` and ``label``."""

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        n_overlays: int = 4,
        split: str = "test",
        split_check: Mapping[str, str] | None = None,
    ):
        self.output_dir, self.class_names, self.n_overlays = Path(output_dir), list(class_names), n_overlays
        self.split, self.split_check = split, dict(split_check or {})
        self.rows: list[dict[str, Any]] = []
        self.overlays: list[Path] = []

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.STARTED, lambda e: (self.rows.clear(), self.overlays.clear()))
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        evaluator.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, evaluator: Engine) -> None:
        for item in evaluator.state.output:
            meta = dict(item["image"].meta)
            name = str(meta["filename_or_obj"])
            pred = torch.as_tensor(item["pred"]).cpu().numpy() > 0.5
            truth = torch.as_tensor(item["label"]).cpu().numpy() > 0.5
            spacing = _spacing(meta, pred.ndim - 1)
            for c, class_name in enumerate(self.class_names):
                dice, iou = overlap_scores(pred[c], truth[c])
                self.rows.append(
                    {
                        "image": name,
                        "split": self.split,
                        "class": class_name,
                        "dice": dice,
                        "iou": iou,
                        "hd95": hd95(pred[c], truth[c], spacing),
                        "truth_voxels": int(truth[c].sum()),
                        "pred_voxels": int(pred[c].sum()),
                    }
                )
            if len(self.overlays) < self.n_overlays:
                self.overlays.append(self._overlay(name, meta, pred.any(0), truth.any(0)))

    def _overlay(self, name: str, meta: dict, pred: np.ndarray, truth: np.ndarray) -> Path:
        image, _ = read_image(name)
        if pred.ndim == 3:  # a volume: the slice with the most truth (or prediction)
            axis = meta_int(meta.get("sam_slice_axis", 2))
            amount = (truth | pred).sum(axis=tuple(a for a in range(3) if a != axis))
            index = int(np.argmax(amount))
            image, pred, truth = image.take(index, axis=1 + axis), pred.take(index, axis), truth.take(index, axis)
        path = self.output_dir / "overlays" / f"{output_stem(name)}.png"

        def write(tmp: Path) -> None:
            buffer = io.BytesIO()
            Image.fromarray(overlay(image, truth, pred)).save(buffer, format="PNG")
            tmp.write_bytes(buffer.getvalue())

        return atomic_write(path, write)

    def _write(self, evaluator: Engine) -> None:
        path = self.output_dir / "metrics.csv"

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(path, write)
        n_images = len({r["image"] for r in self.rows})
        logger.info("evaluation of %d image(s) written to %s", n_images, path)
        logger.info("scored on the %s split: %s", self.split, SPLITS.get(self.split, self.split))
        status, detail = self.split_check.get("status"), self.split_check.get("detail")
        if detail:  # what model.pt's record of its split says of these images
            (logger.info if status == "checked" else logger.warning)("split %s: %s", status, detail)
        for line in summary_lines(self.rows, self.class_names):
            logger.info(line)
        if self.overlays:
            logger.info("overlays (truth green, prediction red): %s", self.overlays[0].parent)


def summary_lines(rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> list[str]:
    lines = [f"{'class':<16}{'n':>4}{'Dice':>16}{'IoU':>16}{'HD95':>18}"]
    for name in class_names:
        mine = [r for r in rows if r["class"] == name]
        if not mine:
            continue
        cells = []
        for key in ("dice", "iou", "hd95"):
            values = np.array([r[key] for r in mine], dtype=np.float64)
            finite = values[~np.isnan(values)]
            text = f"{finite.mean():.3f} ± {finite.std():.3f}" if finite.size else "n/a"
            if key == "hd95" and finite.size < values.size:
                text += f" ({values.size - finite.size} empty)"
            cells.append(text)
        lines.append(f"{name:<16}{len(mine):>4}{cells[0]:>16}{cells[1]:>16}{cells[2]:>18}")
    return lines
