"""The split the prompts were trained on: which images trained them and which chose them.

Training records it in ``model.pt`` (``ptsam_split``) beside the prompts: the training and
validation images, each by its path (relative to ``dataset_dir`` where it lies there) and by
what identifies its content (a digest of the file's bytes; a DICOM series' SeriesInstanceUID),
with ``val_fraction``, ``test_fraction`` and ``split_group`` (which images are one patient's).
Evaluation rebuilds its split from its own settings and the folder as it is now: another
``test_fraction`` or ``split_group``, or images added since training, move training and
validation images into ``test``. So before any work it compares the images it is
about to score with the record, by content (a renamed or moved copy counts too):

- ``test``: refused when any of them trained or chose the prompts, each named;
- ``validation`` / ``training``: scored, with a line saying how many trained or chose the prompts.

A ``model.pt`` without a record (an older bundle's, a federated global model) is evaluated with a
warning that this cannot be checked. A record may be incomplete, and then says so in ``notes``:
MONAI Label continues the prompts of the previous ``model.pt`` (whose record it carries over), a
federated site's prompts also learned from other sites' images. Evaluation reports the outcome
as ``status``: checked | partial | unchecked (MLflow's ``split_check`` tag).

MONAI Label compares a new training's prompts with the served ``model.pt``'s before it replaces
it: ``comparison_images`` picks, from the new training's validation images, those that neither set
of prompts trained on or chose, to be held out of that training for the comparison.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.io import ImageReadError
from ..data.io.formats import SERIES_SEP, split_series
from ..data.io.readers import dicom_series_in
from ..model.prompt_file import read_split

logger = logging.getLogger(__name__)

VERSION = 1
ROLES = ("training", "validation")
_ROLE_TEXT = {
    "training": "a training image (it trained the prompts)",
    "validation": "a validation image (it chose the prompts: their best epoch)",
}
_DIGESTS: dict[tuple[str, int, int], str] = {}  # one read per file and process (a study's cells share images)


class HeldOutError(ValueError):
    """Images about to be scored as held-out test images that trained or chose the prompts."""


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = "sha256:" + digest.hexdigest()[:32]
    return _DIGESTS[key]


def image_id(image: str | Path) -> str | None:
    """What identifies an image wherever it lies and whatever it is called: a DICOM series by its
    SeriesInstanceUID (unique by the standard), a file by a digest of its bytes. None when it
    cannot be read (the dataset check names such files)."""
    folder, uid = split_series(image)
    try:
        if uid is not None:
            return f"dicom:{uid}"
        if folder.is_dir():  # a folder of one DICOM series
            uids = [split_series(s)[1] for s in dicom_series_in(folder)]
            return "dicom:" + "+".join(uids) if uids else None
        return _file_digest(folder)
    except (OSError, ImageReadError):
        return None


def _name(image: str | Path, root: Path) -> str:
    folder, uid = split_series(image)
    try:
        name = Path(folder).resolve().relative_to(root).as_posix()
    except ValueError:  # outside dataset_dir (dataset.json may point anywhere; MONAI Label's datastore)
        name = str(folder)
    return f"{name}{SERIES_SEP}{uid}" if uid else name


def _entries(items: Sequence[Mapping[str, Any]], root: Path) -> list[list[str | None]]:
    return [[_name(item["image"], root), image_id(item["image"])] for item in items]


def _merge(mine: list, theirs: Sequence) -> list:
    known = {digest for _, digest in mine}
    return mine + [list(e) for e in theirs if e[1] not in known]


def record(
    dataset_dir: str | Path,
    training: Sequence[Mapping[str, Any]],
    validation: Sequence[Mapping[str, Any]],
    val_fraction: float,
    test_fraction: float,
    started_from: str | Path | None = None,
    note: str | None = None,
    split_group: str | None = None,
) -> dict[str, Any]:
    """The split a training records in ``model.pt``. ``started_from``: a ``model.pt`` whose prompts
    this training continues (MONAI Label): its images count as this training's too. A record with
    ``split_group`` (null included) was made by a bundle whose splits keep a patient's images together."""
    root = Path(dataset_dir).resolve()
    split: dict[str, Any] = {
        "version": VERSION,
        "dataset_dir": str(root),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "split_group": split_group,
        "training": _entries(training, root),
        "validation": _entries(validation, root),
        "notes": [note] if note else [],
    }
    if started_from and Path(started_from).is_file():
        before = read_split(started_from)
        if before is None:
            split["notes"].append(f"the prompts continue those of {started_from}, which records no split")
        else:
            for role in ROLES:
                split[role] = _merge(split[role], before.get(role, []))
            split["notes"] += [n for n in before.get("notes", []) if n not in split["notes"]]
    return split


def _seen(split: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """digest -> (role, recorded name); training wins over validation."""
    seen = {}
    for role in ("validation", "training"):
        for name, digest in split.get(role, []):
            if digest:
                seen[digest] = (role, name)
    return seen


def comparison_images(
    served: str | Path, training: Sequence[Mapping[str, Any]], validation: Sequence[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], str]:
    """The validation images of a training that continues (or replaces) the prompts in ``served``
    to hold out of that training, so that both sets of prompts can be compared on images neither
    trained on or chose: those of ``validation`` that ``served``'s record lists in neither role and
    no image of ``training`` or of the rest of ``validation`` repeats (by content). At most half of
    ``validation`` is held out: the rest chooses the new prompts' best epoch. Returns the images
    (in ``validation``'s order) and, where there are none, why."""
    if not validation:
        return [], "there are no validation images"
    split = read_split(served)
    if split is None:
        return [], f"{served} records no split, so which images trained or chose its prompts is unknown"
    if split.get("notes"):
        return [], f"{served}'s record of its split is incomplete ({'; '.join(split['notes'])})"
    ids = [image_id(item["image"]) for item in validation]
    seen = set(_seen(split)) | {image_id(item["image"]) for item in training}
    counts = Counter(ids)
    unseen = [
        item
        for item, digest in zip(validation, ids, strict=True)
        if digest and digest not in seen and counts[digest] == 1
    ]
    held = unseen[: len(validation) // 2]
    if held:
        return held, ""
    if unseen:
        return [], "the only validation image is needed to choose the new prompts' best epoch"
    return [], f"each validation image trained or chose the prompts in {served}, or repeats an image of this training"


def _settings(values: tuple) -> str:
    said = f"test_fraction={values[0]}, val_fraction={values[1]}"
    return said + (f", split_group={values[2]!r}" if len(values) > 2 else "")


def _refusal(
    path: Path,
    split: Mapping[str, Any],
    hits: list,
    n: int,
    val_fraction: float,
    test_fraction: float,
    split_group: str | None,
) -> str:
    lines = [f"{image}: {_ROLE_TEXT[role]}, recorded as {name}" for image, role, name in hits]
    was = (split.get("test_fraction"), split.get("val_fraction"), split.get("split_group"))
    now = (float(test_fraction), float(val_fraction), split_group)
    if was != now:
        shown = slice(None) if was[2] != now[2] else slice(2)  # split_group said where it differs
        why = (
            f"{path} was trained with {_settings(was[shown])}; this run asks for {_settings(now[shown])}, "
            "which carves another test split out of the folder"
        )
    else:
        why = "the folder's images changed since training (added, removed or renamed), which moves the split"
        if "split_group" not in split:
            why += (
                f"; or {path} was trained by an earlier bundle, whose split did not keep a case's or patient's "
                "images together (a DICOM series and its NIfTI copy, a patient's series)"
            )
    return (
        f"evaluation refused: {len(hits)} of the {n} test image(s) to score trained or chose the prompts "
        f"in {path}, so their scores would not be held-out scores:\n  "
        + "\n  ".join(lines)
        + f"\nThe test split is rebuilt from this run's settings and the folder as it is now: {why}. "
        "Evaluate with the training's fractions and split_group on the folder as it was, keep a labelled test "
        "set apart (imagesTs/ + labelsTs/, or labelled `test` entries in dataset.json), or score "
        "`--eval_section validation` (the images that chose the prompts: an optimistic score)."
    )


def check_evaluation(
    model_path: str | Path,
    items: Sequence[Mapping[str, Any]],
    section: str,
    val_fraction: float,
    test_fraction: float,
    split_group: str | None = None,
) -> dict[str, str]:
    """Compare the images an evaluation scores with the split recorded in ``model_path``; raise
    ``HeldOutError`` when ``section`` is 'test' and any of them trained or chose the prompts.
    Returns ``{"status": ..., "detail": ...}`` for the report and the tracking run."""
    path = Path(model_path)
    if not path.is_file():
        return {"status": "no model", "detail": ""}  # the prompt loader says how to train
    split = read_split(path)
    n = len(items)
    if split is None:
        detail = (
            f"{path} records no split (an older bundle's file, or a federated global model): whether "
            f"the {n} {section} image(s) trained or chose the prompts cannot be checked"
        )
        logger.warning(detail)
        return {"status": "unchecked", "detail": detail}
    seen = _seen(split)
    hits = []
    for item in items:
        digest = image_id(item["image"])
        if digest in seen:
            hits.append((str(item["image"]), *seen[digest]))
    if section == "test" and hits:
        raise HeldOutError(_refusal(path, split, hits, n, val_fraction, test_fraction, split_group))
    counts = Counter(role for _, role, _ in hits)
    detail = (
        f"of the {n} {section} image(s) scored, {counts['training']} trained the prompts in {path}, "
        f"{counts['validation']} chose them, {n - len(hits)} neither (checked by content against its record)"
    )
    expected = {"test": set(), "validation": {"validation"}, "training": {"training"}}.get(section, set())
    (logger.warning if set(counts) - expected else logger.info)(detail)
    notes = split.get("notes") or []
    for note in notes:
        logger.warning("%s's record of its split is incomplete: %s", path, note)
    return {"status": "partial" if notes else "checked", "detail": "; ".join([detail, *notes])}
