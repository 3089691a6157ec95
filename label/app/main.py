"""MONAI Label app serving the PTSAM bundle as a live model (the ``monaibundle`` app's way:
MONAI Label's own bundle infer and train tasks on a local bundle folder, no zoo look-up).

Configuration (``--conf KEY VALUE`` on ``monailabel start_server``; `make label` sets them):

- ``bundle``: the bundle folder (default: this repository's ``bundle/``), used as it is;
- ``model_name``: the model's name in MONAI Label (default ``ptsam``);
- ``sam_variant``, ``sam_checkpoint``: the frozen SAM, passed to the bundle's configs (default:
  the configs' own values). They must be the backbone ``models/model.pt`` was trained on.
- ``encoder_engine`` (``torch`` | ``onnxruntime`` | ``openvino``), ``encoder_int8``,
  ``encoder_bf16``: inference's CPU fast paths for the image encoder (``docs/benchmarks.md``: a
  CT volume in about a quarter of the stock encoder's time). Checked at start-up: an unknown
  engine, a package this environment lacks, a CPU without bfloat16 units for ``encoder_bf16``,
  or a CUDA device stops the server with the reason. Training keeps PyTorch.
- ``allow_other_kind``: ``true`` segments images of another kind (2D image, 3D volume) than
  ``models/model.pt`` records its prompts were trained on; by default inference refuses them
  (422, naming the image and both kinds), as the recipe fitted to one kind makes meaningless
  masks of the other.

What this adds to MONAI Label's bundle tasks, and why:

- the label sent back is the file the bundle's own writer wrote (each input's format, axis
  order and geometry); MONAI Label's writer assumes MONAI's x-first 2D arrays and transposes
  our 2D results;
- only the datastore's images are served: an image is named by its id (a DICOM series is a
  sub-folder of the studies folder, its id the folder's name, handed out as a NIfTI file of it
  as MONAI Label's DICOMweb datastore does, so that 3D Slicer can load it), or is what this
  server itself received (an upload, a session). Any other name or path is answered 404, the
  same whether or not a file exists there (MONAI Label reads any path on the machine);
- a series' image info (which Next Sample's answer carries) names that file, as 3D Slicer
  names a download by it;
- bad input is answered with an HTTP error that names the image and the problem (404 unknown
  image or model, 415 unsupported file, 422 unreadable or of another kind than model.pt's
  prompts learned from), where MONAI Label answers a bare 500;
- training never resumes an older run's state: every ``/train`` is a new MLflow-tracked run
  starting from the current ``model.pt``, with the preprocessing recipe recorded in it
  (inference reads that recipe through the bundle's own ``inference.yaml``); the new
  ``model.pt``'s record of the images that trained the prompts keeps those of the old one;
- a ``/train`` replaces the served ``model.pt`` only if its prompts score at least as well:
  the run writes them beside it (in a hidden ``.train-*`` folder its process holds while it runs:
  one that a stopped or killed training leaves is removed by the next training, or when the
  server starts), then the served and the new prompts are scored by
  ``train.yaml``'s validation (mean Dice), in the same process, and the new ones are published
  only where they score at least as high (MONAI Label would overwrite a good specialist with
  whatever a short run on a few corrections gave). They are compared on validation images held
  out of the run that the served prompts did not train on or choose either (images labelled
  since they were trained), else on the run's validation images, which chose the new prompts:
  the outcome's ``comparison`` names the images and says whether it is unbiased, and why not.
  With nothing served, or a ``model.pt`` that cannot be read, the new prompts are published;
  with no validation images the served ``model.pt`` is kept (nothing shows the new prompts are
  not worse). The train option ``publish: always`` publishes in every case. The outcome (both
  Dice values, the comparison, ``kept``: ``served`` or ``new``, and why) is logged, is the
  task's result (the last lines of ``GET /train/``), stays in ``/info``'s ``train_stats``
  (``models/train_stats.json``), and is added to the training's MLflow run (metrics
  ``publish_dice_served``, ``publish_dice_new``; tags ``publish_rule``, ``publish_kept``,
  ``publish_unbiased``; ``publish_outcome.json``).
  ``pretrained: false`` starts from untrained prompts (MONAI Label 0.8.5 fails on it);
- a ``model.pt`` that cannot be read (a truncated copy, a garbled record) does not stop the
  server: the log names the file and the error, inference answers 409 with them until it is
  replaced, and ``/train`` trains new prompts from untrained ones with ``train.yaml``'s recipe;
- a ``model.pt`` written by ``/train`` after start-up makes the model available at once (``/info``
  lists it, as 3D Slicer reads it there);
- the model is ``model.pt`` as trained: its class and prompt counts build the network (MONAI Label
  takes the configs' one class), its ``class_names`` name the label values (metadata.json's
  ``channel_def`` names one ``foreground``); another ``model.pt`` put in its place is served as
  that one, a removed one no longer (MONAI Label would serve the untrained prompts), and no other
  ``models/*.pt`` is offered (it would run with model.pt's recipe and names);
- with ``instance_labels``, the answer's ``label_names`` (3D Slicer names the values by them)
  name the numbered objects, not the classes;
- the datastore's labelled images are split into training and validation as the bundle splits a
  folder (``held_out``: ``val_split`` of them by a hash of their names, whole cases and patients:
  DICOM series of one PatientID, and with the train option ``split_group``, else train.yaml's, a
  patient's slices), where MONAI Label cuts its ordered list through a patient's images, so that
  validation, which chooses the epoch and decides the publish rule, is scored on unseen patients;
  ``split_group`` is recorded in the new model.pt's split. ``val_split`` -1 (MONAI Label: the
  bundle's default validation) holds out train.yaml's ``val_fraction``, not train.yaml's list
  from ``dataset_dir``;
- training refuses a ``model.pt`` whose recipe reads a label value as another class than the
  server writes it with (class c as value c), as viewers send back the server's labels.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import types
import uuid
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException


def _import_monailabel_without_torchvision() -> None:
    """``monailabel.transform.post`` imports torchvision for a debug helper it never calls here.
    Where torchvision does not import (CPU torch from another index), a stand-in is registered
    only while that module loads, and removed again so that nothing else mistakes it for the
    real package."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or present but broken against this torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stand_in, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")

        def unavailable(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("torchvision is not installed in this MONAI Label environment")

        utils.make_grid = utils.save_image = unavailable
        stand_in.utils = utils
        sys.modules.update({"torchvision": stand_in, "torchvision.utils": utils})
        try:
            import monailabel.transform.post  # noqa: F401
        finally:
            del sys.modules["torchvision"], sys.modules["torchvision.utils"]


_import_monailabel_without_torchvision()

import monailabel  # noqa: E402
from monai.transforms import SaveImaged  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402

logger = logging.getLogger(__name__)

REPO_BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
BACKBONE_KEYS = ("sam_variant", "sam_checkpoint")
ENGINE_KEYS = ("encoder_engine", "encoder_int8", "encoder_bf16")  # inference only: training refuses them
INFER_KEYS = ("allow_other_kind",)  # inference only: images of another kind than model.pt's prompts learned from


def bundle_overrides(conf: dict[str, str]) -> dict[str, Any]:
    """The bundle settings this app's configuration sets (the frozen SAM)."""
    return {key: conf[key] for key in BACKBONE_KEYS if conf.get(key)}


def engine_overrides(bundle: str, conf: dict[str, str]) -> dict[str, Any]:
    """Inference's encoder engine from the configuration, refused now if it cannot run here."""
    chosen = {key: conf[key] for key in ENGINE_KEYS if conf.get(key)}
    if chosen:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # what inference.yaml's device picks
        with _BundleImports(bundle):
            from scripts.model.runtime import require_engine

            require_engine(
                chosen.get("encoder_engine", "torch"),
                chosen.get("encoder_int8", False),
                device,
                chosen.get("encoder_bf16", False),
            )
    return chosen


class _BundleImports:
    """The bundle's ``scripts`` package importable for a moment, as MONAI Label does it."""

    def __init__(self, bundle: str):
        self.bundle = bundle

    def __enter__(self) -> None:
        sys.path.insert(0, self.bundle)

    def __exit__(self, *exc: Any) -> None:
        sys.path.remove(self.bundle)


def _check_image(bundle: str, image: Any) -> None:
    """Refuse an image whose header the bundle cannot read, naming it and the problem, before
    any work (header only: the pixels are read once, by the inference itself)."""
    if not isinstance(image, str):
        return  # an in-memory array: the bundle's loader will say what is wrong
    with _BundleImports(bundle):
        from scripts.data.io import UnsupportedFileError, probe_image

        try:
            probe_image(image)
        except UnsupportedFileError as err:
            raise HTTPException(status_code=415, detail=str(err)) from err
        except ValueError as err:  # ImageReadError and what the format's reader raised
            raise HTTPException(status_code=422, detail=str(err)) from err


MODEL_FILE = "model.pt"
OBJECTS_KEY = "objects"  # in /infer's answer with instance_labels: how many objects the label numbers
NETWORK_KEYS = ("n_md_prompts", "n_ie_prompts", "num_classes")  # the network's shape, recorded in model.pt


def _model_file(bundle: str) -> Path:
    return Path(bundle) / "models" / MODEL_FILE


def _trained_model(bundle: str) -> dict[str, Any] | None:
    """What the bundle's ``models/model.pt`` was trained as: its network's prompt and class counts
    (``network``) and the label value of each class's name (``labels``, 1..C as inference writes
    them); None where there is no model.pt. A file without PTSAM's record gives no counts: loading
    it then refuses it, naming the file."""
    path = _model_file(bundle)
    if not path.is_file():
        return None
    with _BundleImports(bundle):
        from scripts.engine.recipe import LEGACY
        from scripts.model.prompt_file import META_KEY, decode_meta, read_prompt_file

        state = read_prompt_file(path)
        recipe = _trained_recipe(bundle)
    meta = decode_meta(state.get(META_KEY)) or {}
    network = {key: meta[key] for key in NETWORK_KEYS if key in meta}
    # A garbled record is refused here, named: read on, it would stop the server at start-up.
    if any(type(value) is not int or value < (1 if key == "num_classes" else 0) for key, value in network.items()):
        raise ValueError(f"{path}: its network record {network} does not hold whole counts")
    names = recipe.get("class_names") or LEGACY["class_names"]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: its recipe's class_names {names!r} is not a list of names")
    if len(names) != network.get("num_classes", len(names)):  # a name for every value written
        names = [f"class {c}" for c in range(1, network["num_classes"] + 1)]
    return {"network": network, "labels": {name: value for value, name in enumerate(names, start=1)}}


def _read_served(bundle: str) -> tuple[dict[str, Any] | None, str]:
    """``_trained_model`` and why model.pt cannot be read ("" if it can): whatever is wrong with the
    file (a truncated copy, a garbled record) is reported, never raised into the server's start."""
    try:
        return _trained_model(bundle), ""
    except Exception as err:  # noqa: BLE001 (any failure to read the file is the file's problem here)
        path, text = str(_model_file(bundle)), str(err)
        return None, text if path in text else f"{path} cannot be read: {text}"


def _trained_recipe(bundle: str) -> dict[str, Any]:
    """The recipe knobs recorded in the bundle's ``models/model.pt`` (none before the first training);
    for a file of an older bundle, the knobs added since, as it saw them (its layout)."""
    model = _model_file(bundle)
    if not model.is_file():
        return {}
    with _BundleImports(bundle):
        from scripts.engine.recipe import ADDED, recorded_recipe

        recipe = recorded_recipe(model) or dict(ADDED)
    recipe.pop("image_size", None)  # follows sam_variant
    recipe.pop("image_kind", None)  # no knob: a training finds it from its own images
    return recipe


def _check_label_values(recipe: dict[str, Any], model: Path) -> None:
    """Refuse a recipe that reads a label value as another class than the one this server writes
    with it (class c as value c): the labels viewers send back are the server's labels, corrected,
    and would silently train other classes (with ``classes: [2]``, ``label_map: {1: 0}``, a
    corrected class-1 label would train background)."""
    from scripts.data.labels import class_of_values

    names = recipe.get("class_names") or []
    found, _ = class_of_values(range(len(recipe["classes"]) + 1), recipe["classes"], recipe.get("label_map"))
    wrong = [
        f"value {v} ({names[v - 1] if v <= len(names) else v}) would be read as "
        + (f"class {c} ({names[c - 1] if c <= len(names) else c})" if c else "background")
        for v, c in found.items()
        if c != v
    ]
    if wrong:
        raise ValueError(
            f"{model} reads label values as other classes than this server writes them: {'; '.join(wrong)} "
            f"(its classes {recipe['classes']}, label_map {recipe.get('label_map') or {}}). The labels sent "
            "back from a viewer hold the server's values; relabel the datastore's labels to hold class c as "
            "value c and train a model with classes 1..C, or train outside the server"
        )


def _checkpoint_loader(handlers: list) -> dict | None:
    """The ``CheckpointLoader`` MONAI Label adds to the training's handlers to start from model.pt."""
    return next((h for h in handlers if isinstance(h, dict) and h.get("_target_") == "CheckpointLoader"), None)


def _read_error(err: BaseException) -> BaseException | None:
    """The bundle's error about the input image behind ``err`` (unreadable, or of another kind than
    the prompts were trained on; MONAI wraps it in transform errors)."""
    while err is not None:
        if type(err).__name__ in ("ImageReadError", "UnsupportedFileError", "ImageKindError"):
            return err
        err = err.__cause__ or err.__context__
    return None


def _is_plain_name(name: str) -> bool:
    """A datastore id or session name is a file name, never a path (MONAI Label's DICOMweb
    datastore and sessions join it to their folder as it is)."""
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name


class StudiesDatastore(LocalDatastore):
    """MONAI Label's local datastore, where a sub-folder of the studies folder that holds DICOM
    files is an image too, its id the folder's name (MONAI Label's own indexes files only).

    Such a series is handed out (``get_image_uri``: inference, ``/datastore/image``, Next
    Sample's ``path``) as a NIfTI file of it, as MONAI Label's DICOMweb datastore hands out its
    series: 3D Slicer loads that path, or the download, as a volume file, and cannot load a
    folder. Training's datalist keeps the folder (the bundle reads the series itself)."""

    def __init__(self, bundle: str, *args: Any, **kwargs: Any):
        with _BundleImports(bundle):
            from scripts.data.io.formats import looks_like_dicom  # the bundle's test: .dcm, or DICM
            from scripts.data.io.readers import read_image

        self._looks_like_dicom, self._read_image = looks_like_dicom, read_image
        self._series_dir = Path(tempfile.mkdtemp(prefix="ptsam-series-"))
        atexit.register(shutil.rmtree, self._series_dir, True)
        self._series_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        if uri and os.path.isdir(uri):
            return self._as_nifti(image_id, Path(uri)) or uri
        return uri

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(image_id)
        if info.get("path") and os.path.isdir(info["path"]):
            # Next Sample's answer carries this info: 3D Slicer names a download by its `name`
            # (the id has no extension, and the volume reader could not tell the format).
            info["path"] = self.get_image_uri(image_id)
            info["name"] = os.path.basename(info["path"])
        return info

    def _as_nifti(self, image_id: str, folder: Path) -> str | None:
        """The series as ``<id>.nii.gz`` in the bundle's reading (RAS geometry, its voxel values),
        converted once per content of the folder; None where the bundle refuses the folder (the
        inference of it then says why)."""
        import hashlib

        import nibabel as nib
        import numpy as np

        files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in folder.iterdir() if e.is_file())
        key = hashlib.sha256(repr((str(folder), files)).encode()).hexdigest()[:16]
        out = self._series_dir / key / f"{image_id}.nii.gz"
        with self._series_lock:
            if not out.is_file():
                try:
                    array, meta = self._read_image(folder)
                except (ValueError, OSError) as err:
                    logger.warning("%s: handed out as the folder, not as NIfTI: %s", folder, err)
                    return None
                data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)  # x, y, z (, c)
                out.parent.mkdir(parents=True, exist_ok=True)
                part = out.with_name(f".part-{out.name}")  # nibabel compresses by the name's suffix
                nib.save(nib.Nifti1Image(data, meta["affine"]), part)
                os.replace(part, out)
        return str(out)

    def _is_series(self, folder: Path) -> bool:
        if folder.name.startswith(".") or not folder.is_dir():
            return False
        try:
            return any(self._looks_like_dicom(entry) for entry in folder.iterdir())
        except OSError:  # unreadable: not an image of this datastore
            return False

    def _list_files(self, path: str, patterns: Any) -> dict[str, str]:
        files = super()._list_files(path, patterns)
        if os.path.realpath(path) == os.path.realpath(self._datastore.image_path()):
            files.update({entry.name: entry.name for entry in Path(path).iterdir() if self._is_series(entry)})
        return files

    def _to_id(self, file: str) -> tuple[str, str]:
        # A series folder's name is its id whole: MONAI Label would take "1.2.840" for id "1", ext ".2.840".
        if self._is_series(Path(self._datastore.image_path()) / file):
            return file, ""
        return super()._to_id(file)


class PTSAMInferTask(BundleInferTask):
    """The bundle's ``inference.yaml`` as a MONAI Label segmentation model."""

    def __init__(self, path: str, conf: dict[str, str], overrides: dict[str, Any], labels: dict[str, int]):
        self.overrides = overrides
        self.prediction_dir = tempfile.mkdtemp(prefix="ptsam-label-")
        # SaveImaged is not in the bundle; its own WriteLabeld stays and writes to prediction_dir.
        super().__init__(path, conf, post_filter=[SaveImaged], add_post_restore=False)
        # Volumes are segmented whole (slice by slice inside), 2D images as they are.
        self.dimension = 3
        # The classes model.pt was trained for (metadata.json names one class, whatever was trained).
        self.labels = labels
        # Only model.pt: the recipe and the class names inference uses are those recorded in it.
        self._config["model_filename"] = [MODEL_FILE]

    def _load_bundle_config(self, path: str, config: str):
        parser = super()._load_bundle_config(path, config)
        parser.update({**self.overrides, "output_dir": self.prediction_dir})
        return parser

    def __call__(self, request: dict, callbacks: Any = None):
        _check_image(self.bundle_path, request.get("image"))
        try:
            written, answer = super().__call__(request, callbacks)
            if OBJECTS_KEY in answer:
                # Numbered objects, not classes: 3D Slicer names a label's values by `label_names`.
                answer["label_names"] = {f"object {i}": i for i in range(1, answer[OBJECTS_KEY] + 1)}
            return written, answer
        except HTTPException:
            raise
        except Exception as err:
            if (cause := _read_error(err)) is not None:
                raise HTTPException(status_code=422, detail=str(cause)) from err
            logger.exception("inference failed")
            raise HTTPException(status_code=500, detail=f"{request.get('image')}: inference failed: {err}") from err

    def writer(self, data: dict, extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        """Send the label the bundle wrote (``pred_path``), or with the ``geojson`` option its
        polygons (``pred_geojson_path``, for QuPath), moved out of its folder so nothing piles up;
        MONAI Label deletes what it sends."""
        written = data.get(f"{self.key_pred}_path")
        if not written:
            return super().writer(data, extension, dtype)
        answer = dict(data.get(self.output_json_key, {}))
        with _BundleImports(self.bundle_path):
            from scripts.common.flags import flag

            if flag(data.get("instance_labels", False)):
                answer[OBJECTS_KEY] = int(torch.as_tensor(data[self.key_pred]).max())
        polygons = data.get(f"{self.key_pred}_geojson_path")
        if polygons:
            os.unlink(written)  # the label itself is not sent: it would stay behind
            written = polygons
        name = Path(written).name
        suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
        handle, out = tempfile.mkstemp(suffix=suffix)
        os.close(handle)
        shutil.move(written, out)
        return out, answer


PUBLISH_RULES = ("if_not_worse", "always")  # the train option `publish`; the first is the default
STATS_FILE = "train_stats.json"  # beside model.pt, where MONAI Label's own train tasks keep theirs
STAGING = ".train-"  # a train's folder for its prompts, beside model.pt; hidden: MONAI Label offers no file of it
TRAIN_TAG = "monailabel_train"  # on the MLflow run of a /train: which one it is, to add its outcome


def _remove_stale_staging(bundle: str) -> None:
    """Remove the staging folders of trainings that no longer run (stopped with DELETE /train,
    which kills them, or killed otherwise); a running training holds its own (``held_folder``)."""
    with _BundleImports(bundle):
        from scripts.common.files import remove_unheld

        for folder in remove_unheld(_model_file(bundle).parent, STAGING):
            logger.info("removed %s, left by a training that was stopped or killed", folder)


def _publish_rule(request: dict) -> str:
    rule = request.get("publish", PUBLISH_RULES[0])
    rule = rule[0] if isinstance(rule, list) and rule else rule  # the option's list as info() shows it
    if rule not in PUBLISH_RULES:
        raise ValueError(f"publish {rule!r}: one of {', '.join(PUBLISH_RULES)}")
    return rule


class PTSAMTrainTask(BundleTrainTask):
    """The bundle's ``train.yaml`` under MONAI Label's overrides (its datalist, epochs, handlers).

    The run writes its prompts beside model.pt, not over it; they replace model.pt only by the
    ``publish`` rule (``_publish``), and the outcome is the task's result and its ``stats()``."""

    def __init__(self, path: str, conf: dict[str, str], overrides: dict[str, Any]):
        self.overrides = overrides
        self._served_problem = ""  # why the served model.pt cannot be read, during a train
        self._candidate: Path | None = None  # where this train's prompts are written
        self._run_overrides: dict[str, Any] = {}  # what the run was given, for scoring alike
        self._split_group: str | None = None  # this train's split_group (the request's, else train.yaml's)
        self._rule = PUBLISH_RULES[0]
        self._validation: list = []  # the validation images MONAI Label's split gave this train
        self._held_out: list = []  # of those, the ones kept out of the run to compare the prompts on
        self._why_none_held = ""  # why none could be
        self._train_id = ""  # this train's MLflow run carries it (TRAIN_TAG)
        super().__init__(path, conf)

    def _load_bundle_config(self, path: str, config: str):
        parser = super()._load_bundle_config(path, config)
        parser.update(self.overrides)
        return parser

    def config(self) -> dict[str, Any]:
        # split_group: a text field in 3D Slicer's training options (empty: none), train.yaml's by default
        split_group = self.bundle_config.get("split_group") or ""
        return {
            **super().config(), "model_filename": [MODEL_FILE], "publish": list(PUBLISH_RULES),
            "split_group": split_group,
        }  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """The last train's outcome (/info's ``train_stats``): the Dice of the served and the new
        prompts, the images they were compared on and whether that is unbiased, and which model.pt
        is served now."""
        try:
            return json.loads((_model_file(self.bundle_path).parent / STATS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def __call__(self, request: dict, datastore: Datastore):
        chosen = request.get("model_filename", MODEL_FILE)
        if (chosen if isinstance(chosen, str) else chosen[0]) != MODEL_FILE:
            # The run would start from that file's prompts with model.pt's recipe, and overwrite model.pt.
            raise ValueError(f"model_filename {chosen!r}: this server trains {MODEL_FILE} only")
        rule = self._rule = _publish_rule(request)
        self._train_id = uuid.uuid4().hex
        served = _model_file(self.bundle_path)
        self._served_problem = _read_served(self.bundle_path)[1]
        if self._served_problem:
            logger.warning(
                "%s: this training starts from untrained prompts with train.yaml's recipe, and its "
                "prompts replace that file",
                self._served_problem,
            )
        # In models/ (one file system: the new prompts replace model.pt atomically), held by this
        # process while it lives: a killed training's is removed by the next one, or at start-up.
        _remove_stale_staging(self.bundle_path)
        with _BundleImports(self.bundle_path):
            from scripts.common.files import held_folder, release_folder

            work, hold = held_folder(served.parent, STAGING)
        self._candidate = work / MODEL_FILE
        try:
            super().__call__(request, datastore)
            if not self._candidate.is_file():
                raise RuntimeError(f"the training wrote no prompts ({self._candidate}); {served} is unchanged")
            outcome = self._publish(rule)
            outcome["mlflow_run"] = self._track(outcome)
        finally:
            release_folder(work, hold)
        with _BundleImports(self.bundle_path):
            from scripts.common.files import atomic_write

            stats = json.dumps(outcome, indent=2)
            atomic_write(served.parent / STATS_FILE, lambda part: part.write_text(stats))
        return outcome

    def _publish(self, rule: str) -> dict[str, Any]:
        """Replace model.pt with the new prompts unless they score below the served ones.

        The rule (``publish``, default ``if_not_worse``): both prompt files are scored by
        train.yaml's validation (its key metric, mean Dice), in this process, and the new prompts
        replace model.pt only where they score at least as well (a tie publishes them: they were
        trained on the newer labels). They are compared on the validation images held out of the
        run (``_update_overrides``): neither set of prompts trained on or chose them. Where none
        could be held out, on the run's validation images, which chose the new prompts' best
        epoch: the outcome says the comparison is biased toward them, and why no image was
        unbiased. Nothing served, or a model.pt that cannot be read: the new prompts are
        published. No validation images: the served model.pt is kept, since nothing shows the new
        prompts are not worse (label more images, or raise val_split). ``always`` publishes in
        every case, scored where it can be."""
        served, candidate = _model_file(self.bundle_path), self._candidate
        outcome: dict[str, Any] = {
            "model": str(served), "publish": rule, "validation_images": len(self._validation),
            "comparison": None, "served_dice": None, "new_dice": None,
        }  # fmt: skip
        if not served.is_file():
            publish, reason = True, "no model.pt was served"
        elif self._served_problem:
            publish, reason = True, f"the served one cannot be read ({self._served_problem})"
        elif not self._validation:
            publish = rule == "always"
            advice = "; publish: always" if publish else " (label more images, raise val_split, or publish: always)"
            reason = f"no validation images, so the new prompts could not be compared with the served ones{advice}"
        else:
            outcome["comparison"] = comparison = self._comparison(served)
            images = self._held_out or self._validation
            outcome["served_dice"], outcome["new_dice"] = self._score([served, candidate], images)
            better = outcome["new_dice"] >= outcome["served_dice"]
            publish = better or rule == "always"
            reason = (
                f"validation mean Dice on {len(images)} image(s): served {outcome['served_dice']:.4f}, "
                f"new {outcome['new_dice']:.4f}" + ("" if better else "; publish: always" if publish else "")
                + f"; compared on {comparison['basis']}"
            )  # fmt: skip
        if publish:
            os.replace(candidate, served)
        outcome.update(published=publish, kept="new" if publish else "served", reason=reason)
        message = "published the new prompts as %s: %s" if publish else "kept the served %s: %s"
        (logger.info if publish else logger.warning)(message, served, reason)
        return outcome

    def _comparison(self, served: Path) -> dict[str, Any]:
        """Which images the served and the new prompts are compared on, and whether that is unbiased."""
        images = self._held_out or self._validation
        names = [os.path.basename(str(item["image"])) for item in images]
        if self._held_out:
            basis = "images held out of this run's validation, which neither set of prompts trained on or chose"
            return {"images": names, "unbiased": True, "basis": basis}
        why = self._why_none_held or f"publish: {self._rule} holds none out"
        if self._why_none_held:  # the rule: images left out of both sets of prompts exist only thus
            why += (
                "; MONAI Label gives every labelled image to the run's training or validation, so only validation "
                "images labelled since the served prompts were trained can be held out, one in two at most"
            )
        basis = (
            "this run's validation images, which chose the new prompts' best epoch: biased toward the new "
            f"prompts (no image could be held out: {why})"
        )
        with _BundleImports(self.bundle_path):
            from scripts.engine.splits import image_id
            from scripts.model.prompt_file import read_split

            split = read_split(served) or {}
            seen = {digest for role in ("training", "validation") for _, digest in split.get(role, [])}
            optimistic = sum(image_id(item["image"]) in seen for item in images)
        if optimistic:  # the split moves as images are added: the served prompts may have seen these
            basis += f"; {optimistic} of them trained or chose the served prompts: its score is optimistic too"
        return {"images": names, "unbiased": False, "basis": basis}

    def _parser(self, **more: Any) -> Any:
        """train.yaml as the run was configured (call with the bundle's scripts importable)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_meta(self.bundle_metadata_path)
        parser.read_config(self.bundle_config_path)
        parser.update({**self._run_overrides, **more})
        return parser

    def _track(self, outcome: dict[str, Any]) -> str | None:
        """The outcome in the training's MLflow run (the bundle's tracking closed it when training
        ended): the Dice values as ``publish_dice_served`` and ``publish_dice_new``, the rule, the
        decision and whether the comparison was unbiased as ``publish_*`` tags, and the whole
        outcome as ``publish_outcome.json``. Returns the run's id; None, said in the log, where it
        cannot be written (model.pt is published or kept by then either way)."""
        with _BundleImports(self.bundle_path):
            from scripts.common.flags import flag

            parser = self._parser()
            if not flag(parser.get_parsed_content("tracking_enabled")):
                return None
            uri, experiment = parser.get_parsed_content("tracking_uri"), parser.get_parsed_content("experiment_name")
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id], f"tags.{TRAIN_TAG} = '{self._train_id}'") if found else []
            if not runs:
                logger.warning(
                    "no MLflow run of this training in %s (%s): the outcome is not recorded there", uri, experiment
                )
                return None
            run = runs[0].info.run_id
            for key in ("served", "new"):
                if outcome[f"{key}_dice"] is not None:
                    client.log_metric(run, f"publish_dice_{key}", outcome[f"{key}_dice"])
            comparison = outcome["comparison"] or {}
            tags = {"rule": outcome["publish"], "kept": outcome["kept"], "unbiased": comparison.get("unbiased")}
            for key, value in tags.items():
                client.set_tag(run, f"publish_{key}", "none" if value is None else str(value).lower())
            client.log_text(run, json.dumps(outcome, indent=2), "publish_outcome.json")
            return run
        except Exception as err:  # noqa: BLE001 (a store that fails now: said, the decision stands)
            logger.warning("the outcome could not be recorded in MLflow run of this training in %s: %s", uri, err)
            return None

    def _score(self, files: list[Path], images: list) -> list[float]:
        """Each prompt file's key metric on ``images``, by train.yaml's validation as the run was
        configured (recipe, network, device), with one network and evaluator for all files."""
        with _BundleImports(self.bundle_path):
            from scripts.engine.distributed import unwrap
            from scripts.model.prompt_file import load_prompts

            # Scored outside the run: nothing of it is tracked, and no handler of the training attaches.
            parser = self._parser(**{"validate#dataset#data": images, "tracking_enabled": False})
            evaluator = parser.get_parsed_content("validate#evaluator")
            network = unwrap(parser.get_parsed_content("network"))
            metric = next(iter(parser.get("validate#key_metric")))
            scores = []
            for path in files:
                load_prompts(network, path)
                evaluator.run()
                scores.append(float(evaluator.state.metrics[metric]))
        return scores

    def _load_checkpoint(self, model_pytorch: str, pretrained: Any, train_handlers: list) -> None:
        # pretrained false: MONAI Label 0.8.5 would fail on os.path.exists(None). An unreadable
        # model.pt is not loaded: the run starts from untrained prompts.
        with _BundleImports(self.bundle_path):
            from scripts.common.flags import flag

            if flag(pretrained) and not self._served_problem:
                super()._load_checkpoint(model_pytorch, pretrained, train_handlers)

    def _requested_split_group(self, request: dict) -> str | None:
        """The train option ``split_group`` (3D Slicer's text field: empty is none), else train.yaml's;
        a pattern that is no regular expression is refused, named, before any work."""
        value = request.get("split_group", self.bundle_config.get("split_group"))
        value = value or None
        with _BundleImports(self.bundle_path):
            from scripts.data.datasets import split_pattern

            split_pattern(value)
        return value

    def _partition_datalist(self, datalist: list, request: dict, shuffle: bool = False):
        """The datastore's labelled images split as the bundle splits a folder (``held_out``): whole
        cases and patients (a DICOM PatientID; with ``split_group`` a patient's slices) go to training
        or validation, never both, as validation chooses the epoch and decides the publish rule.
        MONAI Label's own split cuts its ordered list at ``val_split``, through a patient's images."""
        # val_split < 0 is MONAI Label's "the bundle's default": train.yaml's own validation list,
        # which reads dataset_dir (the demo's synthetic images), not the datastore. The bundle's
        # default is its val_fraction, taken here of the datastore's labelled images.
        self._split_group = self._requested_split_group(request)  # the run records it (_update_overrides)
        val_split = float(request.get("val_split", 0.2))
        if val_split < 0:
            val_split = float(self.bundle_config["val_fraction"])
        if val_split >= 1:
            raise ValueError(f"val_split {val_split:g}: the share of labelled images to validate on, below 1")
        with _BundleImports(self.bundle_path):
            from scripts.data.datasets import held_out

            training, validation = held_out(datalist, val_split, "", self._split_group, knob="val_split")
        logger.info(
            "val_split=%g of %d labelled image(s): %d train, %d validate (whole cases and patients%s)",
            val_split, len(datalist), len(training), len(validation),
            f", split_group {self._split_group!r}" if self._split_group else "",
        )  # fmt: skip
        return training, validation

    def _update_overrides(self, overrides: dict[str, Any]) -> None:
        # A new run from the current model.pt (MONAI Label loads it): an older run's resume
        # state would otherwise continue that run, and at its last epoch do nothing. The run
        # keeps the recipe and the network (prompt and class counts) model.pt was trained with,
        # so that its prompts load, and see images and label values as before (an unreadable
        # model.pt: train.yaml's).
        trained, recipe = {"network": {}}, {}
        if not self._served_problem:
            trained = _trained_model(self.bundle_path) or trained
            recipe = _trained_recipe(self.bundle_path)
        if recipe:
            with _BundleImports(self.bundle_path):
                _check_label_values(recipe, _model_file(self.bundle_path))
        overrides.update({**self.overrides, **trained["network"], **recipe, "resume": False})
        overrides["model_path"] = str(self._candidate)  # published by _publish, or not
        overrides["split_group"] = self._split_group  # recorded in model.pt's split; its summary counts patients
        # The run is found by this tag to record the outcome in it (_track), once it has ended.
        tags = {**(self.bundle_config.get("tracking_run#tags") or {}), TRAIN_TAG: self._train_id}
        overrides["tracking_run#tags"] = tags
        self._hold_out(overrides)
        # The new prompts continue those of model.pt: the images that trained or chose them are in
        # the new model.pt's record of its split too (evaluation refuses them as test images).
        loader = _checkpoint_loader(overrides.get("train#handlers", []))
        if loader is not None:
            overrides["split_record#started_from"] = loader["load_path"]
        self._run_overrides = dict(overrides)

    def _hold_out(self, overrides: dict[str, Any]) -> None:
        """Where the new prompts are to be compared with readable served ones to decide, keep the
        validation images that neither trained on or chose out of the run (at most half of them:
        the rest choose its best epoch; ``splits.comparison_images``). MONAI Label's split gives
        every labelled image to the run's training or validation, so such images are those
        labelled since the served prompts were trained; without them the comparison is on images
        that chose the new prompts, and says so."""
        self._validation = list(overrides.get("validate#dataset#data") or [])
        self._held_out, self._why_none_held = [], ""
        served = _model_file(self.bundle_path)
        if self._rule != "if_not_worse" or not self._validation or not served.is_file() or self._served_problem:
            return
        with _BundleImports(self.bundle_path):
            from scripts.engine.splits import comparison_images

            training = overrides.get("train#dataset#data") or []
            self._held_out, self._why_none_held = comparison_images(served, training, self._validation)
        if self._held_out:
            overrides["validate#dataset#data"] = [item for item in self._validation if item not in self._held_out]
            logger.info(
                "%d of the %d validation image(s) are held out of this run, to compare its prompts with %s's: %s",
                len(self._held_out), len(self._validation), served,
                ", ".join(os.path.basename(str(item["image"])) for item in self._held_out),
            )  # fmt: skip


class PTSAMApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundle = str(Path(conf.get("bundle") or REPO_BUNDLE).resolve())
        self.model_name = conf.get("model_name", "ptsam")
        self.overrides = bundle_overrides(conf)
        if not (Path(self.bundle) / "configs" / "inference.yaml").is_file():
            raise ValueError(f"{self.bundle}: not a PTSAM bundle (no configs/inference.yaml)")
        _remove_stale_staging(self.bundle)
        self.infer_overrides = {**self.overrides, **engine_overrides(self.bundle, conf)}
        self.infer_overrides.update({key: conf[key] for key in INFER_KEYS if conf.get(key)})
        if not _model_file(self.bundle).is_file():  # (an unreadable one is reported by init_infers)
            logger.warning(
                "%s has no models/model.pt yet: label a few images and train (POST /train/%s); "
                "inference is offered once it exists",
                self.bundle,
                self.model_name,
            )
        # Uploads (`/infer?file=`, `/session`) arrive as files in tempfile's folder: a folder of this
        # server's own (mode 0700) is what tells them from paths elsewhere on the machine.
        self.received_dir = tempfile.mkdtemp(prefix="ptsam-label-")
        tempfile.tempdir = self.received_dir
        atexit.register(shutil.rmtree, self.received_dir, True)
        self._infers_lock = threading.Lock()
        self._served: dict[str, Any] | None = None  # what the offered model was built for
        self._model_error = ""  # why model.pt cannot be offered, if it cannot
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"PTSAM - prompt-tuned Segment Anything (MONAI Label {monailabel.__version__})",
            description="A frozen SAM steered by a few learned prompt tokens, trained from a handful of labels",
            version=json.loads((Path(self.bundle) / "configs" / "metadata.json").read_text())["version"],
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()  # DICOMweb and the like: their own series folders
        return StudiesDatastore(
            self.bundle,
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _note_model_error(self, error: str) -> None:
        """Remember why model.pt cannot be served (named in /infer's 409), logged once per new error."""
        if error and error != self._model_error:
            logger.error(
                "%s. No model is offered until it is replaced with a readable one, or POST /train/%s "
                "writes new prompts (from untrained ones)",
                error,
                self.model_name,
            )
        self._model_error = error

    def init_infers(self) -> dict[str, InferTask]:
        """The model as ``models/model.pt`` was trained: its prompt and class counts, its class names."""
        self._served, error = _read_served(self.bundle)
        self._note_model_error(error)
        if self._served is None:
            return {}
        overrides = {**self.infer_overrides, **self._served["network"]}
        task = PTSAMInferTask(self.bundle, self.conf, overrides, self._served["labels"])
        return {self.model_name: task} if task.is_valid() else {}

    def init_trainers(self) -> dict[str, TrainTask]:
        task = PTSAMTrainTask(self.bundle, self.conf, self.overrides)
        return {self.model_name: task} if task.is_valid() else {}

    def _refresh_infers(self) -> None:
        """The model as the current ``models/model.pt`` has it: offered once ``/train`` (a subprocess
        of MONAI Label's) has written it, rebuilt where another file with other classes or prompt
        counts replaced it (MONAI Label reloads only the weights, into the old network), and
        withdrawn where it was removed (MONAI Label would go on with the untrained prompts)."""
        with self._infers_lock:  # /info and /infer may ask at once; the task is built once
            now, error = _read_served(self.bundle)
            self._note_model_error(error)
            if now is None:
                self._infers, self._served = {}, None
            elif now != self._served:
                self._infers = self.init_infers()

    def info(self) -> dict:
        self._refresh_infers()
        return super().info()

    def _unknown_model(self, model: Any) -> HTTPException:
        if model == self.model_name and self._model_error:  # a state of the server, as with no model.pt
            detail = f"{self._model_error}. Replace it, or POST /train/{self.model_name} for new prompts"
            return HTTPException(status_code=409, detail=detail)
        if model == self.model_name:
            path = _model_file(self.bundle)
            detail = f"no trained prompts yet ({path}): label a few images, then POST /train/{self.model_name}"
            return HTTPException(status_code=409, detail=detail)
        models = ", ".join(sorted(self._infers)) or f"none until '{self.model_name}' is trained"
        return HTTPException(status_code=404, detail=f"no model '{model}'; the models here: {models}")

    def _received(self, image: str, request: dict) -> bool:
        """Whether ``image`` is what this server was sent: an upload of this request, or the image
        of the session it names."""
        if os.path.dirname(image) == self.received_dir and os.path.isfile(image):
            return True
        session, sessions = request.get("session"), self.sessions()
        if not isinstance(session, dict) or sessions is None or not _is_plain_name(str(session.get("name", ""))):
            return False
        info = sessions.get_session(session["name"], update_ts=False)
        return info is not None and os.path.realpath(info.image) == os.path.realpath(image)

    def _served_image(self, request: dict, datastore: Datastore) -> Any:
        """What MONAI Label is given as the request's image: a datastore id, or what this server
        received; anything else is 404 with one answer, so that no caller learns what exists."""
        image = request.get("image")
        if not isinstance(image, str):
            return image  # an array handed over in-process (MONAI Label's batch inference)
        if _is_plain_name(image):
            uri = datastore.get_image_uri(image)
            if not uri and isinstance(datastore, StudiesDatastore):
                datastore.refresh()  # its file watcher does not see new series folders
                uri = datastore.get_image_uri(image)
            if uri:
                # MONAI Label would take an existing path (in its working folder) before the id.
                return uri if os.path.exists(image) else image
        elif self._received(image, request):
            return image
        detail = f"no image '{image}' in the datastore (GET /datastore/?output=all lists its ids)"
        raise HTTPException(status_code=404, detail=detail)

    def infer(self, request: dict, datastore: Any = None) -> dict:
        self._refresh_infers()
        if request.get("model") not in self._infers:
            raise self._unknown_model(request.get("model"))
        # MONAI Label loads a `model_filename` of the request's params from any path it names.
        files = self._infers[request["model"]].config().get("model_filename") or []
        chosen = request.get("model_filename", files)
        if chosen != files and chosen not in files:
            raise HTTPException(
                status_code=404, detail=f"no model file '{chosen}'; the model files here: {', '.join(files)}"
            )
        datastore = datastore or self.datastore()
        request = {**request, "image": self._served_image(request, datastore)}
        return super().infer(request, datastore)
