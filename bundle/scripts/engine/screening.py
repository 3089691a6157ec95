"""Inference over many files: bad files are reported and skipped, the rest processed, and the
run ends with a summary and a non-zero exit status if anything failed."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events

from ..common.flags import flag
from ..data.datasets import DEFAULT_MAX_VOXELS, check_case
from ..data.io import probe_image

logger = logging.getLogger(__name__)


class Screening:
    """Checks every input before inference starts (headers, then pixels); ``good`` lists
    the cases to run, ``failures`` the others with their problems."""

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        max_voxels: int = DEFAULT_MAX_VOXELS,
        only_2d: bool = False,
        only_dicom: bool = False,
    ):
        self.good: list[dict] = []
        self.failures: list[str] = []
        for item in items:
            problems = check_case(item, max_voxels=max_voxels, require_label=False)
            if not problems:
                problems = _unfit(item["image"], flag(only_2d), flag(only_dicom))
            if problems:
                self.failures += problems
                logger.error("skipped: %s", "; ".join(problems))
            else:
                self.good.append(dict(item))
        if not items:
            self.failures.append("no input images found")
        self.written: list[tuple[str, str]] = []  # (input, output)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)

    def _collect(self, engine: Engine) -> None:
        for item in engine.state.output:
            if "pred_path" in item:
                self.written.append((str(item["image"].meta["filename_or_obj"]), item["pred_path"]))

    def finish(self) -> None:
        """Log the summary; exit with status 1 if any input failed."""
        logger.info("inference: %d written, %d failed", len(self.written), len(self.failures))
        for source, path in self.written:
            logger.info("  wrote %s -> %s", source, path)
        for problem in self.failures:
            logger.error("  failed %s", problem)
        if self.failures:
            raise SystemExit(1)


def _unfit(image: str, only_2d: bool, only_dicom: bool) -> list[str]:
    """Inputs an asked-for output cannot be made of (polygons of a volume, a SEG of a PNG)."""
    if not (only_2d or only_dicom):
        return []
    probe = probe_image(image)
    problems = []
    if only_2d and len(probe["spatial_shape"]) != 2:
        shape = probe["spatial_shape"]
        problems.append(f"{image}: a volume {shape}; GeoJSON polygons (geojson: true) are for 2D images")
    if only_dicom and probe["format"] != "dicom":
        problems.append(f"{image}: a {probe['format']} file; a DICOM SEG (dicom_seg: true) is made for DICOM inputs")
    return problems
