"""MONAI Label app serving the PTSAM bundle as a live model (the ``monaibundle`` app's way:
MONAI Label's own bundle infer and train tasks on a local bundle folder, no zoo look-up).

Configuration (``--conf KEY VALUE`` on ``monailabel start_server``; `make label` sets them):

- ``bundle``: the bundle folder (default: this repository's ``bundle/``), used as it is;
- ``model_name``: the model's name in MONAI Label (default ``ptsam``);
- ``sam_variant``, ``sam_checkpoint``: the frozen SAM, passed to the bundle's configs (default:
  the configs' own values). They must be the backbone ``models/model.pt`` was trained on.

What this adds to MONAI Label's bundle tasks, and why:

- the label sent back is the file the bundle's own writer wrote (each input's format, axis
  order and geometry); MONAI Label's writer assumes MONAI's x-first 2D arrays and transposes
  our 2D results;
- bad input is answered with an HTTP error that names the image and the problem (404 unknown
  image, 415 unsupported file, 422 unreadable), where MONAI Label answers a bare 500;
- training never resumes an older run's state: every ``/train`` is a new MLflow-tracked run
  starting from the current ``model.pt``, with the preprocessing recipe recorded in it
  (inference reads that recipe through the bundle's own ``inference.yaml``);
- a ``model.pt`` written by ``/train`` after start-up makes the model available at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

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
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402

logger = logging.getLogger(__name__)

REPO_BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
BACKBONE_KEYS = ("sam_variant", "sam_checkpoint")


def bundle_overrides(conf: dict[str, str]) -> dict[str, Any]:
    """The bundle settings this app's configuration sets (the frozen SAM)."""
    return {key: conf[key] for key in BACKBONE_KEYS if conf.get(key)}


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


def _trained_recipe(bundle: str) -> dict[str, Any]:
    """The recipe knobs recorded in the bundle's ``models/model.pt`` (none before the first training)."""
    model = Path(bundle) / "models" / "model.pt"
    if not model.is_file():
        return {}
    with _BundleImports(bundle):
        from scripts.model.prompt_file import read_recipe

        recipe = read_recipe(model) or {}
    recipe.pop("image_size", None)  # follows sam_variant
    return recipe


def _read_error(err: BaseException) -> BaseException | None:
    """The bundle's image-reading error behind ``err`` (MONAI wraps it in transform errors)."""
    while err is not None:
        if type(err).__name__ in ("ImageReadError", "UnsupportedFileError"):
            return err
        err = err.__cause__ or err.__context__
    return None


class PTSAMInferTask(BundleInferTask):
    """The bundle's ``inference.yaml`` as a MONAI Label segmentation model."""

    def __init__(self, path: str, conf: dict[str, str], overrides: dict[str, Any]):
        self.overrides = overrides
        self.prediction_dir = tempfile.mkdtemp(prefix="ptsam-label-")
        # SaveImaged is not in the bundle; its own WriteLabeld stays and writes to prediction_dir.
        super().__init__(path, conf, post_filter=[SaveImaged], add_post_restore=False)
        # Volumes are segmented whole (slice by slice inside), 2D images as they are.
        self.dimension = 3

    def _load_bundle_config(self, path: str, config: str):
        parser = super()._load_bundle_config(path, config)
        parser.update({**self.overrides, "output_dir": self.prediction_dir})
        return parser

    def __call__(self, request: dict, callbacks: Any = None):
        _check_image(self.bundle_path, request.get("image"))
        try:
            return super().__call__(request, callbacks)
        except HTTPException:
            raise
        except Exception as err:
            if (cause := _read_error(err)) is not None:
                raise HTTPException(status_code=422, detail=str(cause)) from err
            logger.exception("inference failed")
            raise HTTPException(status_code=500, detail=f"{request.get('image')}: inference failed: {err}") from err

    def writer(self, data: dict, extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        """Send the label the bundle wrote (``pred_path``), moved out of its folder so nothing
        piles up; MONAI Label deletes what it sends."""
        written = data.get(f"{self.key_pred}_path")
        if not written:
            return super().writer(data, extension, dtype)
        name = Path(written).name
        suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
        handle, out = tempfile.mkstemp(suffix=suffix)
        os.close(handle)
        shutil.move(written, out)
        return out, data.get(self.output_json_key, {})


class PTSAMTrainTask(BundleTrainTask):
    """The bundle's ``train.yaml`` under MONAI Label's overrides (its datalist, epochs, handlers)."""

    def __init__(self, path: str, conf: dict[str, str], overrides: dict[str, Any]):
        self.overrides = overrides
        super().__init__(path, conf)

    def _load_bundle_config(self, path: str, config: str):
        parser = super()._load_bundle_config(path, config)
        parser.update(self.overrides)
        return parser

    def _update_overrides(self, overrides: dict[str, Any]) -> None:
        # A new run from the current model.pt (MONAI Label loads it): an older run's resume
        # state would otherwise continue that run, and at its last epoch do nothing. The run
        # keeps the recipe model.pt was trained with, so its prompts see images as before.
        overrides.update({**self.overrides, **_trained_recipe(self.bundle_path), "resume": False})


class PTSAMApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundle = str(Path(conf.get("bundle") or REPO_BUNDLE).resolve())
        self.model_name = conf.get("model_name", "ptsam")
        self.overrides = bundle_overrides(conf)
        if not (Path(self.bundle) / "configs" / "inference.yaml").is_file():
            raise ValueError(f"{self.bundle}: not a PTSAM bundle (no configs/inference.yaml)")
        if not (Path(self.bundle) / "models" / "model.pt").is_file():
            logger.warning(
                "%s has no models/model.pt yet: label a few images and train (POST /train/%s); "
                "inference is offered once it exists",
                self.bundle,
                self.model_name,
            )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"PTSAM - prompt-tuned Segment Anything (MONAI Label {monailabel.__version__})",
            description="A frozen SAM steered by a few learned prompt tokens, trained from a handful of labels",
            version=json.loads((Path(self.bundle) / "configs" / "metadata.json").read_text())["version"],
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = PTSAMInferTask(self.bundle, self.conf, self.overrides)
        return {self.model_name: task} if task.is_valid() else {}

    def init_trainers(self) -> dict[str, TrainTask]:
        task = PTSAMTrainTask(self.bundle, self.conf, self.overrides)
        return {self.model_name: task} if task.is_valid() else {}

    def infer(self, request: dict, datastore: Any = None) -> dict:
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"no image '{image}' in the datastore {self.studies}")
        if request.get("model") == self.model_name and self.model_name not in self._infers:
            self._infers = self.init_infers()  # model.pt written by /train since start-up
            if self.model_name not in self._infers:
                model = Path(self.bundle) / "models" / "model.pt"
                detail = f"no trained prompts yet ({model}): label a few images, then POST /train/{self.model_name}"
                raise HTTPException(status_code=409, detail=detail)
        return super().infer(request, datastore)
