"""The trained specialist as an MLflow model (pyfunc): the prompts and the bundle, registered in
the tracking store's model registry, so that

    model = mlflow.pyfunc.load_model("models:/ptsam/1", model_config={"sam_checkpoint": "/w/sam.pth"})
    labels = model.predict(["/data/case_001.tif", "/data/case_002.nii.gz"])

segments images exactly as ``configs/inference.yaml`` does (the model runs that workflow). SAM's
weights are not in the model: they are given at load time by path, and the prompts' fingerprint
check refuses any other weights than those they were trained on.

Logged as MLflow's "model from code" (this file, with ``scripts/`` as its code path), so loading
runs the bundle's own code and unpickles nothing.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np

logger = logging.getLogger(__name__)

SCRIPTS = Path(__file__).resolve().parent
CONFIGS = SCRIPTS.parent / "configs"


class PTSAMModel(mlflow.pyfunc.PythonModel):
    """``predict(paths)`` -> one label array per image, in the image's own grid."""

    def load_context(self, context: Any) -> None:
        from scripts.model.prompt_file import META_KEY, decode_meta, read_prompt_file

        config = dict(context.model_config or {})
        self.prompts = context.artifacts["prompts"]
        self.configs = Path(context.artifacts["configs"])
        self.sam_checkpoint = config.get("sam_checkpoint")
        self.allow_random_weights = bool(config.get("allow_random_weights", False))
        self.meta = decode_meta(read_prompt_file(self.prompts).get(META_KEY)) or {}

    def predict(self, context: Any, model_input: list[Any], params: dict | None = None) -> list[np.ndarray]:
        from monai.bundle import ConfigParser

        from scripts.data.io import read_image

        paths = _paths(model_input)
        with tempfile.TemporaryDirectory(prefix="ptsam-pyfunc-") as out:
            parser = ConfigParser()
            parser.read_config(str(self.configs / "inference.yaml"))
            parser.update(
                {
                    "bundle_root": str(self.configs.parent),
                    "output_dir": out,
                    "model_path": self.prompts,
                    "sam_variant": self.meta.get("sam_variant", "vit_b"),
                    "sam_checkpoint": self.sam_checkpoint,
                    "allow_random_weights": self.allow_random_weights,
                    "n_md_prompts": self.meta.get("n_md_prompts", 8),
                    "n_ie_prompts": self.meta.get("n_ie_prompts", 0),
                    "num_classes": self.meta.get("num_classes", 1),
                    "screening#items": [{"image": p} for p in paths],
                    **(params or {}),
                }
            )
            parser.get_parsed_content("initialize")
            screening = parser.get_parsed_content("screening")
            if screening.failures:
                raise ValueError("; ".join(screening.failures))
            parser.get_parsed_content("evaluator").run()
            if screening.failures:  # a file that failed during inference
                raise ValueError("; ".join(screening.failures))
            written = dict(screening.written)
            return [np.asarray(read_image(written[p], as_label=True)[0][0]) for p in paths]


def _paths(model_input: Any) -> list[str]:
    """Image paths from a list, a pandas Series or a DataFrame with an ``image`` column."""
    if hasattr(model_input, "columns"):
        model_input = model_input["image"] if "image" in model_input.columns else model_input.iloc[:, 0]
    if isinstance(model_input, (str, Path)):
        model_input = [model_input]
    return [str(p) for p in list(model_input)]


def log_model(model_path: str | Path, registered_model_name: str | None = None) -> Any:
    """Log the prompts and the bundle's code and configs as a pyfunc model in the active run,
    registered as ``registered_model_name`` when given."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).resolve()),
        artifacts={"prompts": str(model_path), "configs": str(CONFIGS)},
        code_paths=[str(SCRIPTS)],
        pip_requirements=_requirements(),
        registered_model_name=registered_model_name,
        model_config={"sam_checkpoint": None, "allow_random_weights": False},  # given at load time
    )


def _requirements(names: Sequence[str] = ("torch", "monai", "segment-anything", "mlflow", "pytorch-ignite")) -> list:
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


mlflow.models.set_model(PTSAMModel())
