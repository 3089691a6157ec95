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
every machine and in every order. Images of one case or patient are one group, held out or kept
whole (``case_groups``): a case in two formats (a DICOM series folder ``ct_006/`` and its NIfTI
``ct_006.nii.gz``), a patient's DICOM series (one PatientID), and with ``split_group`` the images
whose names that regular expression gives the same group (a patient's 2D slices).

``inference`` lists the images to predict: the ``test`` list (labels or not), else ``imagesTs/``,
else every image in the folder (less earlier predictions beside their images, ``<name>_seg.*``),
or one file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import ImageReadError, UnsupportedFileError, list_images, probe_image, read_image
from .io.formats import SERIES_SEP, case_name, output_stem, split_series, stem_of
from .io.readers import patient_of
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


def _name(item: Mapping) -> str:
    """The name an image is ranked and grouped by: its file's (a DICOM series: ``folder`` or ``folder::uid``)."""
    return Path(str(item["image"])).name


def split_pattern(split_group: str | None) -> re.Pattern | None:
    """``split_group`` compiled; a ValueError naming the knob where it is no regular expression."""
    if split_group is None:
        return None
    try:
        return re.compile(split_group)
    except (re.error, TypeError) as err:
        raise ValueError(f"split_group {split_group!r}: not a regular expression ({err})") from err


def _group_of(pattern: re.Pattern, name: str) -> str | None:
    """The group ``pattern`` names in ``name``: its first capture group, else the whole match; None
    where it does not match or names nothing (an empty or unmatched group)."""
    found = pattern.search(name)
    if found is None:
        return None
    return (found.group(1) if pattern.groups else found.group(0)) or None


def _keys(items: Sequence[Mapping], split_group: str | None, strict: bool) -> list[list[str]]:
    """Per image, what ties it to others: its case name (less the format's suffix), its DICOM
    PatientID, its ``split_group``. With ``strict``, an image the pattern names no group for is
    refused: left a group of its own, it could land apart from the rest of its patient."""
    pattern = split_pattern(split_group)
    keys, unmatched = [], []
    for item in items:
        found = [f"case name {case_name(item['image'])!r}"]
        patient = patient_of(item["image"])
        if patient:
            found.append(f"PatientID {patient!r}")
        if pattern is not None:
            group = _group_of(pattern, _name(item))
            if group is not None:
                found.append(f"split_group {group!r}")
            elif strict:
                unmatched.append(
                    f"{item['image']}: split_group {pattern.pattern!r} names no group in its name {_name(item)!r}; "
                    "with split_group every image split or listed needs one (alone, it could be in another "
                    "split than its patient's other images): widen the pattern, or rename the file"
                )
        keys.append(found)
    if unmatched:
        raise DatasetError(unmatched)
    return keys


def case_groups(items: Sequence[Mapping], split_group: str | None = None, strict: bool = True) -> list[list[int]]:
    """Indices of ``items`` in groups that must lie in one split, in the order of their first image.
    Images are one group when they share, directly or through others, a case name (the file name
    less its image suffix, ``.nii.gz`` one suffix; a DICOM series: its folder's name), a PatientID
    (DICOM, read from one file's header) or the group ``split_group`` names in their file names
    (its first capture group, else the whole match). With ``strict``, a ``DatasetError`` names
    every image ``split_group`` does not match."""
    return _joined(_keys(items, split_group, strict))


def _joined(keys: Sequence[Sequence[str]]) -> list[list[int]]:
    """Indices of images in groups, given each image's keys: images sharing a key, directly or through
    others, are one group (in the order of their first image)."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, found in enumerate(keys):
        for key in found:
            parent[root(i)] = root(first.setdefault(key, i))
    groups: dict[int, list[int]] = {}
    for i in range(len(keys)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _one_group(items: Sequence[Mapping], split_group: str | None, fraction: float, knob: str) -> str:
    """Why ``fraction`` of ``items``, all one group, cannot be held out: what ties the most of them."""
    tied: dict[str, int] = {}
    for keys in _keys(items, split_group, strict=False):
        for key in keys:
            tied[key] = tied.get(key, 0) + 1
    shared = sorted((k for k, n in tied.items() if n > 1), key=lambda k: -tied[k])[:3]
    listed = ", list the held-out cases in dataset.json" if knob.endswith("_fraction") else ""  # not MONAI Label's
    return (
        f"{knob}={fraction:g}: the {len(items)} images to split form one group (a case or patient: "
        + ", ".join(f"{k} for {tied[k]}" for k in shared)
        + f"), so none can be held out without leaking that patient into both splits; set {knob} 0{listed}, "
        "or add images of other patients"
    )


def held_out(
    items: Sequence[Mapping], fraction: float, salt: str = "", split_group: str | None = None, knob: str = "fraction"
) -> tuple[list[dict], list[dict]]:
    """(kept, held out): a deterministic ``fraction`` of the images, by whole groups (``case_groups``).

    Each group ranks by a hash of ``salt`` and its smallest image file name (an image alone in its
    group: its own name, as before groups existed). The target is ``fraction`` of the images rounded
    half up, at least one when there are two or more images, at most all but one. Groups are taken in
    rank order while the held-out images are under the target: a group is taken when more than half
    of it fits (so the count ends nearest the target; a tie stays under it), and never when it would
    leave no image kept; where no group fits so, the first-ranked one that leaves an image kept is
    held out (at least one held-out image, as without groups). Where none can be (all the images
    one group), a ``DatasetError`` says so, naming ``knob``. With groups of one image alone this is
    the cut before groups existed: the first ``target`` names in rank order."""
    if not items or fraction <= 0:
        return [dict(it) for it in items], []
    n = len(items)
    if n == 1:
        return [dict(items[0])], []
    groups = case_groups(items, split_group)
    ranked = sorted(groups, key=lambda g: hashlib.sha256((salt + min(_name(items[i]) for i in g)).encode()).hexdigest())
    target = min(n - 1, max(1, math.floor(n * fraction + 0.5)))
    out: set[int] = set()
    for group in ranked:
        if len(out) >= target:
            break
        if len(out) + len(group) / 2 < target and len(out) + len(group) < n:
            out.update(group)
    if not out:  # every group larger than twice the target: the first that leaves an image kept
        out.update(next((g for g in ranked if len(g) < n), []))
    if not out:
        raise DatasetError([_one_group(items, split_group, fraction, knob)])
    if len(out) != target:
        logger.info(
            "%s=%g: %d of %d images held out, whole cases or patients (%d asked)", knob, fraction, len(out), n, target
        )
    return [dict(it) for i, it in enumerate(items) if i not in out], [dict(items[i]) for i in sorted(out)]


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


def _refuse_split_cases(root: Path, splits: Mapping[str, Sequence[Mapping]], split_group: str | None) -> None:
    """Images of one case or patient (``case_groups``) in two splits: a case's twin in another format,
    a series of the same PatientID or, with ``split_group``, a slice of the same patient would be
    scored on what trained or chose the prompts. Split by fractions, groups stay whole; lists given
    (dataset.json, imagesTs/) are checked here, each key that ties images of two splits named."""
    items = [(name, item) for name, part in splits.items() for item in part]
    keys = _keys([item for _, item in items], split_group, strict=split_group is not None)
    problems = []
    for group in _joined(keys):
        if len({items[i][0] for i in group}) < 2:
            continue
        for key in dict.fromkeys(k for i in group for k in keys[i]):  # each key once, in order
            tied = [i for i in group if key in keys[i]]
            names = list(dict.fromkeys(items[i][0] for i in tied))
            if len(names) < 2:
                continue
            shown = ", ".join(f"{items[i][1]['image']} ({items[i][0]})" for i in tied[:6])
            more = f" and {len(tied) - 6} more" if len(tied) > 6 else ""
            problems.append(
                f"{key} ties images listed under {' and '.join(names)} in {root}: {shown}{more}; one case or "
                "patient in two splits is scored on images that trained or chose the prompts: list them under "
                "one split (or, if they are different cases, rename one)"
            )
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
    dataset_dir: str | Path,
    section: str = "training",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_group: str | None = None,
) -> list[dict]:
    """The cases of ``section`` ('training', 'validation', 'test' or 'inference') as absolute paths;
    see the module's docstring for how the splits are made. ``split_group``: a regular expression
    whose first capture group (else whole match) in an image's file name names its patient, whose
    images then stay in one split (``held_out``); every image split by a fraction must match it."""
    root = Path(dataset_dir)
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {', '.join(SECTIONS)}, got {section!r}")
    split_pattern(split_group)  # a bad pattern is named before any folder is read
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
        training, test = held_out(training, test_fraction, "test:", split_group, knob="test_fraction")
        if section != "test":  # evaluation's dataset check names these with every other problem
            _refuse_unlabelled_held_out(test)
    if not validation:
        training, validation = held_out(training, val_fraction, "", split_group, knob="val_fraction")
    splits = {"training": training, "validation": validation, "test": test}
    _refuse_shared_images(root, splits)
    _refuse_split_cases(root, splits, split_group)
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


def describe_split(training: Sequence[Mapping], validation: Sequence[Mapping], split_group: str | None = None) -> str:
    """Log (and return) what a training learns from and what chooses its best epoch: a folder of
    one's own is split by rule (``val_fraction``, ``test_fraction``), so the counts are news; where
    images of one case or patient are grouped (``case_groups``), how many groups each split has."""
    groups = [case_groups(part, split_group, strict=False) for part in (training, validation)]
    grouped = any(len(g) > 1 for part in groups for g in part)
    of = [f" of {len(part)} case(s) or patient(s)" if grouped else "" for part in groups]
    said = f"training on {len(training)} image(s){of[0]}; " + (
        f"{len(validation)} validation image(s){of[1]} choose the best epoch"
        if validation
        else "no validation image: the final prompts will be saved"
    )
    if grouped:
        said += " (the images of one case or patient are kept in one split)"
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
