"""Inference over many files, each on its own: bad files are reported and skipped, the rest
written, and the run ends with a summary and exit status 1 if anything failed.

What headers can tell is checked before any inference (``Screening``), among it whether a file
is of the kind of image the prompts were trained on (``scripts.data.kinds``). A file that fails later
(reading or preprocessing in ``PerFileDataset``, the network or the postprocessing and writing
in ``PerFileEvaluator``) becomes a failure record ``{"image": <file>, "failure": <reason>}`` in
place of its outputs (``AllOrNothing`` removes what it had written) and the next file runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.engines import SupervisedEvaluator

from ..common.errors import debugging, reason
from ..common.flags import flag
from ..data.datasets import DEFAULT_MAX_VOXELS, DatasetError, check_case
from ..data.io import probe_image
from ..data.io.dicom_seg import check_seg_source
from ..data.kinds import check_kind, kind_mismatch, kind_of_shape, kind_problem
from ..data.transforms import channel_problem

logger = logging.getLogger(__name__)

FAILURE = "failure"  # the key of a failed file's record


class Screening:
    """Checks every input before inference starts (headers, then pixels); ``good`` lists the
    cases to run, ``failures`` the others with their problems (one entry a file). An input of
    another kind than ``image_kind``, the kind of images the prompts were trained on (None: not
    recorded), is one of them unless ``allow_other_kind``. Attached to the evaluator, it
    collects what each iteration wrote or why it failed; ``finish`` reports."""

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        max_voxels: int = DEFAULT_MAX_VOXELS,
        only_2d: bool = False,
        only_dicom: bool = False,
        channels: Sequence[int] | None = None,
        image_kind: str | None = None,
        allow_other_kind: bool = False,
    ):
        self.good: list[dict] = []
        self.failures: list[str] = []
        kind = None if flag(allow_other_kind) else check_kind(image_kind, "model.pt's recipe")
        for item in items:
            problems = check_case(item, max_voxels=max_voxels, require_label=False)
            if not problems:
                problems = header_problems(item["image"], channels, flag(only_2d), flag(only_dicom), kind)
            if problems:
                self.failures.append("; ".join(problems))  # a file's problems each name it
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
            if FAILURE in item:
                self.failures.append(item[FAILURE])
            elif "pred_path" in item:
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


def header_problems(
    image: str,
    channels: Sequence[int] | None = None,
    only_2d: bool = False,
    only_dicom: bool = False,
    image_kind: str | None = None,
) -> list[str]:
    """What an input's headers say a later step would refuse: another kind of image than the
    prompts were trained on (``image_kind``; None: any), channels the preprocessing cannot
    take, GeoJSON polygons (``only_2d``) of a volume, a DICOM SEG (``only_dicom``) of another
    format or of a series it cannot reference (a multi-frame instance, no frame of reference)."""
    probe = probe_image(image)
    problems = []
    problem = kind_problem(image, kind_of_shape(probe["spatial_shape"]), image_kind)
    if problem:
        problems.append(problem)
    problem = channel_problem(probe["channels"], channels)
    if problem:
        problems.append(f"{image}: {problem}")
    shape = probe["spatial_shape"]
    if only_2d and sum(n > 1 for n in shape) > 2:
        problems.append(f"{image}: a volume {shape}; GeoJSON polygons (geojson: true) are for 2D images")
    if only_dicom and probe["format"] != "dicom":
        problems.append(f"{image}: a {probe['format']} file; a DICOM SEG (dicom_seg: true) is made for DICOM inputs")
    elif only_dicom:
        try:
            check_seg_source(image)
        except ValueError as err:
            detail = str(err).removeprefix(f"{image}: ")  # a file of a series keeps its name
            problems.append(f"{image}: no DICOM SEG (dicom_seg: true) can be made: {detail}")
    return problems


def check_inputs(items: Sequence[Mapping[str, Any]], channels: Sequence[int] | None = None) -> None:
    """Evaluation and training: refuse before any work, naming each file, the inputs the
    preprocessing would stop on (an evaluation of the rest would score a subset unannounced)."""
    problems = [p for item in items for p in header_problems(item["image"], channels)]
    if problems:
        raise DatasetError(problems)


def check_kinds(items: Sequence[Mapping[str, Any]], image_kind: str | None, allow_other_kind: bool = False) -> None:
    """Evaluation: refuse before any work, naming each, the images of another kind than the
    prompts were trained on (``image_kind``, as model.pt records it; None: not recorded), unless
    ``allow_other_kind`` (then each is named in a warning). A file whose header does not read is
    left to ``check_dataset``, which names it."""
    trained = check_kind(image_kind, "model.pt's recipe")
    found = []
    for item in items:
        try:
            kind = kind_of_shape(probe_image(item["image"])["spatial_shape"])
        except ValueError:
            continue
        found.append((item["image"], kind))
    if flag(allow_other_kind):
        for image, kind in found:
            if mismatch := kind_mismatch(image, kind, trained):
                logger.warning("%s; scored anyway (allow_other_kind true)", mismatch)
        return
    problems = [p for image, kind in found if (p := kind_problem(image, kind, trained))]
    if problems:
        raise DatasetError(problems)


def failure(image: Any, err: BaseException) -> dict:
    """The record of an input that failed, its reason naming the file."""
    why = reason(err)
    message = why if str(image) in why else f"{image}: {why}"
    logger.error("failed %s", message, exc_info=err if debugging() else None)
    return {"image": str(image), FAILURE: message}


class PerFileDataset(Dataset):
    """MONAI's ``Dataset`` whose item is a failure record, not an error ending the run, when its
    file fails to load or preprocess."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:
            return failure(self.data[index]["image"], err)


class PerFileEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` over one file per iteration (the data loader's ``batch_size`` is 1;
    a volume's slices are batched by the inferer). A failure record from ``PerFileDataset``
    passes through; an error in the network or the postprocessing becomes one, and the next
    file runs. The iteration's output is the list of per-file dicts either way."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if getattr(self.data_loader, "batch_size", 1) != 1:
            raise ValueError(
                f"one file per iteration: the data loader's batch_size must be 1, not {self.data_loader.batch_size}"
            )

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> list[dict]:
        if FAILURE in batchdata:  # collated: one entry per file
            return [
                {"image": image, FAILURE: why}
                for image, why in zip(batchdata["image"], batchdata[FAILURE], strict=True)
            ]
        try:
            return super()._iteration(engine, batchdata)
        except Exception as err:
            return [failure(_source(batchdata), err)]


def _source(batch: Mapping[str, Any]) -> str:
    names = getattr(batch.get("image"), "meta", {}).get("filename_or_obj", ["an input"])
    return str(names[0] if isinstance(names, (list, tuple)) else names)
