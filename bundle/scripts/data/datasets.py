"""Datasets: find the cases of a dataset folder, split them, and check them before long work.

A dataset folder holds either ``dataset.json`` (Decathlon style: ``training`` and optional
``validation`` lists of ``{"image", "label"}``, an optional ``test`` list; paths relative to
the folder) or ``imagesTr/`` + ``labelsTr/`` with matching names (and ``imagesTs/``, with
``labelsTs/`` for a labelled test set).

Three labelled splits, none of which sees another's images:

- ``test``: what evaluation scores by default, images that chose nothing. ``dataset.json``'s
  ``test`` entries that have a label, else ``imagesTs/`` + ``labelsTs/`` (with a ``dataset.json``
  whose ``test`` lists images alone, as the Decathlon's does: those images, each with the file of
  its name in ``labelsTs/``), else a deterministic ``test_fraction`` of the training cases,
  carved out first;
- ``validation``: what selects the best epoch and stops early. ``dataset.json``'s
  ``validation`` list, else a deterministic ``val_fraction`` of what is left;
- ``training``: the rest.

Splits rank cases by a hash of their file name (salted per split), so they are the same on
every machine and in every order. ``inference`` lists the images to predict: the ``test``
list (labels or not), else ``imagesTs/``, else every image in the folder (less earlier predictions
beside their images, ``<name>_seg.*``), or one file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import ImageReadError, UnsupportedFileError, list_images, probe_image, read_image
from .io.formats import SERIES_SEP, output_stem, split_series, stem_of
from .io.writers import predicted_stem
from .labels import class_of_values, describe_bad_labels
from .pairs import LabelGridError, label_on_image_grid

logger = logging.getLogger(__name__)

DEFAULT_MAX_VOXELS = 1 << 28  # 268 M voxels: a 512 x 512 x 1024 volume
MIN_SIZE = 8


class DatasetError(ValueError):
    """Problems found in a dataset, one line per file."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the dataset:\n  " + "\n  ".join(self.problems))


def _resolve(root: Path, entry: Any) -> Any:
    if isinstance(entry, Mapping):
        return {k: _resolve(root, v) if k in ("image", "label") else v for k, v in entry.items()}
    folder, uid = split_series(entry)
    path = folder if folder.is_absolute() else (root / folder).resolve()
    return f"{path}{SERIES_SEP}{uid}" if uid else str(path)


def _note_ignored(ignored: Sequence[str]) -> None:
    for entry in ignored:  # a path, or a path with the reason it was left out (no such path)
        logger.info("ignored %s", entry if not Path(entry).exists() else f"{entry}: not an image file")


def _pairs(images_dir: Path, labels_dir: Path) -> list[dict]:
    images, ignored = list_images(images_dir)
    labels = {stem_of(p): p for p in list_images(labels_dir)[0]} if labels_dir.is_dir() else {}
    _note_ignored(ignored)
    return [{"image": p, "label": labels.get(stem_of(p), str(labels_dir / Path(p).name))} for p in images]


def _labels_ts(root: Path, listed: Sequence[Any]) -> list[dict]:
    """The labelled test set of ``labelsTs/`` beside a ``dataset.json`` whose ``test`` entries have
    no label: each listed image with the label of its name there (a missing one is named by the
    dataset check), or without a ``test`` list the ``imagesTs/`` + ``labelsTs/`` pairs."""
    labels_dir = root / "labelsTs"
    if not labels_dir.is_dir():
        return []
    if not listed:
        return _pairs(root / "imagesTs", labels_dir) if (root / "imagesTs").is_dir() else []
    labels = {stem_of(p): p for p in list_images(labels_dir)[0]}
    pairs = []
    for entry in (e if isinstance(e, dict) else {"image": e} for e in listed):
        image = split_series(entry["image"])[0]  # a DICOM series: its folder's name
        pairs.append({**entry, "label": labels.get(stem_of(image), str(labels_dir / image.name))})
    return pairs


def held_out(items: Sequence[Mapping], fraction: float, salt: str = "") -> tuple[list[dict], list[dict]]:
    """(kept, held out): a deterministic ``fraction`` (at least one case when there are two or
    more and ``fraction > 0``), chosen by a hash of each image's name and ``salt``."""
    if not items or fraction <= 0:
        return [dict(it) for it in items], []
    ranked = sorted(items, key=lambda it: hashlib.sha256((salt + Path(str(it["image"])).name).encode()).hexdigest())
    n_out = max(1, math.floor(len(items) * fraction + 0.5)) if len(items) > 1 else 0
    out = {id(it) for it in ranked[:n_out]}
    return [dict(it) for it in items if id(it) not in out], [dict(it) for it in items if id(it) in out]


SECTIONS = ("training", "validation", "test", "inference")


def _read_spec(spec: Path) -> dict:
    try:
        return json.loads(spec.read_text())
    except ValueError as err:
        raise DatasetError([f"{spec}: not valid JSON ({err})"]) from err


def _inference_items(root: Path, content: dict | None) -> list[dict]:
    if content and content.get("test"):
        return [e if isinstance(e, dict) else {"image": e} for e in (_resolve(root, t) for t in content["test"])]
    folder = root / "imagesTs" if (root / "imagesTs").is_dir() else root
    images, ignored = list_images(folder)
    if not images:
        raise DatasetError([_nothing_to_predict(root)])
    _note_ignored(ignored)
    sources = {output_stem(p): p for p in images}
    kept = []
    for path in images:
        source = sources.get(predicted_stem(output_stem(path)))
        if source is not None and source != path:
            logger.info("ignored %s: the prediction of %s beside it", path, Path(split_series(source)[0]).name)
        else:
            kept.append({"image": path})
    return kept


def _nothing_to_predict(root: Path) -> str:
    """Where inference looked for images and found none; a training folder's imagesTr/ is named, as
    its images are what a user pointing inference at it most likely meant."""
    looked = (
        "imagesTs/ holds no image files"
        if (root / "imagesTs").is_dir()
        else "no imagesTs/, no image files in the folder itself"
    )
    message = f"{root}: no images to predict (no `test` list in dataset.json, {looked})"
    training = root / "imagesTr"
    n = len(list_images(training)[0]) if training.is_dir() else 0
    if n:
        message += f"; its imagesTr/ holds {n} image(s): to predict them, give --dataset_dir {training}"
    return message


def _refuse_shared_images(root: Path, splits: Mapping[str, Sequence[Mapping]]) -> None:
    """A case listed in two splits would be scored on what trained or chose the prompts."""
    seen: dict[str, str] = {}
    problems = []
    for name, items in splits.items():
        for item in items:
            image = str(item["image"])
            if image in seen and seen[image] != name:
                problems.append(f"{image}: listed under both {seen[image]} and {name} in {root}")
            seen.setdefault(image, name)
    if problems:
        raise DatasetError(problems)


def _layout_hint(root: Path) -> str:
    """What a folder without the expected layout was likely meant as: the images folder itself (its
    parent holds the dataset), or images and masks side by side."""
    if root.name in ("imagesTr", "labelsTr") or (root.parent / "imagesTr").is_dir():
        return f"; {root.name}/ is part of a dataset: give the folder that holds it: --dataset_dir {root.parent}"
    n = len(list_images(root)[0])
    if not n:
        return ""
    return (
        f"; it holds {n} image file(s): put the images in imagesTr/ and their labels, named as their images, "
        "in labelsTr/ (or list the pairs in dataset.json)"
    )


def _refuse_unlabelled_held_out(test: Sequence[Mapping]) -> None:
    """A labelled case carved out as a test image by ``test_fraction`` whose label is missing: the
    same mistake as a missing training label, which chance (the name's hash) put where training
    does not read it; evaluation would refuse it only after the whole training."""
    missing = [
        f"{it['image']}: missing label ({_no_label(it['image'], it['label'])}; held out as a test image by "
        "test_fraction, evaluation needs it)"
        for it in test
        if it.get("label") and not (Path(str(it["label"])).exists() or SERIES_SEP in str(it["label"]))
    ]
    if missing:
        raise DatasetError(missing)


def load_datalist(
    dataset_dir: str | Path, section: str = "training", val_fraction: float = 0.2, test_fraction: float = 0.2
) -> list[dict]:
    """The cases of ``section`` ('training', 'validation', 'test' or 'inference') as absolute paths;
    see the module's docstring for how the splits are made."""
    root = Path(dataset_dir)
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {', '.join(SECTIONS)}, got {section!r}")
    if section == "inference" and root.exists() and not root.is_dir():
        return [{"image": str(root.resolve())}]
    if not root.is_dir():
        raise DatasetError([f"{root}: no such dataset folder"])
    spec = root / "dataset.json"
    content = _read_spec(spec) if spec.is_file() else None
    if section == "inference":
        return _inference_items(root, content)
    if content is not None:
        training = [_resolve(root, e) for e in content.get("training", [])]
        listed = [_resolve(root, t) for t in content.get("test", [])]
        test = [e for e in listed if isinstance(e, dict) and "label" in e] or _labels_ts(root, listed)
        validation = [_resolve(root, e) for e in content.get("validation", [])]
    else:
        if not (root / "imagesTr").is_dir():
            raise DatasetError([f"{root}: neither dataset.json nor imagesTr/ found{_layout_hint(root)}"])
        training, validation = _pairs(root / "imagesTr", root / "labelsTr"), []
        test = _pairs(root / "imagesTs", root / "labelsTs") if (root / "labelsTs").is_dir() else []
    if not test:
        training, test = held_out(training, test_fraction, salt="test:")
        if section != "test":  # evaluation's dataset check names these with every other problem
            _refuse_unlabelled_held_out(test)
    if not validation:
        training, validation = held_out(training, val_fraction)
    _refuse_shared_images(root, {"training": training, "validation": validation, "test": test})
    if section == "test" and not test:
        raise DatasetError(
            [
                f"{root}: no held-out test cases: list them with labels under `test` in dataset.json, put them "
                "in imagesTs/ + labelsTs/, or set test_fraction > 0 (`--eval_section validation` scores the "
                "validation images instead, which chose the model)"
            ]
        )
    return {"training": training, "validation": validation, "test": test}[section]


def _no_label(image_path: Any, label_path: Any) -> str:
    """Why a label is missing, with the file its folder holds that was most likely meant: one whose
    name extends the image's (``case_mask.png``) or that the image's extends (nnU-Net's image
    ``case_0000.nii.gz`` beside its label ``case.nii.gz``)."""
    said = f"{label_path} does not exist"
    folder, image = Path(str(label_path)).parent, stem_of(split_series(str(image_path))[0])
    if not folder.is_dir():
        return said
    meant = [
        p
        for p in list_images(folder)[0]
        if any(
            a.startswith(b) and len(a) > len(b) and a[len(b)] in "_-. "
            for a, b in ((stem_of(p), image), (image, stem_of(p)))
        )
    ]
    return said + (f"; labels pair with images by file name: is it {' or '.join(meant[:3])}?" if meant else "")


def describe_split(training: Sequence[Mapping], validation: Sequence[Mapping]) -> str:
    """Log (and return) what a training learns from and what chooses its best epoch: a folder of
    one's own is split by rule (``val_fraction``, ``test_fraction``), so the counts are news."""
    said = f"training on {len(training)} image(s); " + (
        f"{len(validation)} validation image(s) choose the best epoch"
        if validation
        else "no validation image: the final prompts will be saved"
    )
    logger.info(said)
    return said


def check_case(
    item: Mapping[str, Any],
    classes: Sequence[int] = (1,),
    label_map: Mapping[int, int] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    require_label: bool = True,
) -> list[str]:
    """Every problem of one case, each as '<file>: <problem>'. Headers are checked before pixels."""
    problems: list[str] = []
    image_path = item.get("image")
    try:
        head = probe_image(image_path)
    except (ImageReadError, UnsupportedFileError) as err:
        return [str(err)]
    voxels = math.prod(head["spatial_shape"]) * head["channels"]
    if voxels > max_voxels:
        return [
            f"{image_path}: {voxels:,} values ({head['spatial_shape']} x {head['channels']} channels) exceed the "
            f"budget max_voxels={max_voxels:,}; raise it if the machine has the memory, or crop the image"
        ]
    if sorted(head["spatial_shape"])[-2] < MIN_SIZE:  # in-plane; a volume may have few slices
        return [f"{image_path}: image of shape {head['spatial_shape']} is smaller than {MIN_SIZE} px"]
    try:
        image, meta = read_image(image_path)
    except ImageReadError as err:
        return [str(err)]
    if image.size and not np.isfinite(image).all():
        problems.append(f"{image_path}: contains NaN or infinite values")
    elif image.size and image.min() == image.max():
        problems.append(f"{image_path}: constant image (every value is {image.flat[0]:g})")
    label_path = item.get("label")
    if label_path is None or not (Path(str(label_path)).exists() or SERIES_SEP in str(label_path)):
        if require_label:
            problems.append(
                f"{image_path}: missing label" + (f" ({_no_label(image_path, label_path)})" if label_path else "")
            )
        return problems
    try:
        label, _ = label_on_image_grid(*read_image(label_path, as_label=True), meta)
    except (ImageReadError, UnsupportedFileError, LabelGridError) as err:
        return [*problems, str(err)]
    if label.shape[0] > 1 and not (label == label[:1]).all():
        problems.append(f"{label_path}: label has {label.shape[0]} differing channels, not one label map")
    else:
        _, bad = class_of_values(np.unique(label).tolist(), classes, label_map)
        if bad:
            lossy = Path(str(label_path)).suffix.lower() in (".jpg", ".jpeg")
            note = "; a JPEG label: lossy compression changes the values along every edge; save masks as PNG"
            problems.append(f"{label_path}: {describe_bad_labels(bad, classes)}" + (note if lossy else ""))
    return problems


def check_dataset(
    items: Sequence[Mapping[str, Any]],
    classes: Sequence[int] = (1,),
    label_map: Mapping[int, int] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    require_label: bool = True,
) -> None:
    """Raise ``DatasetError`` listing every problem of every case; nothing is written."""
    if not items:
        raise DatasetError(["no cases found"])
    problems = [p for item in items for p in check_case(item, classes, label_map, max_voxels, require_label)]
    if problems:
        raise DatasetError(problems)
