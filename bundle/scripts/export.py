"""Export the whole trained network — SAM's encoder and decoder with the learned prompts baked
in — for deployment without this bundle::

    python -m scripts.export --filepath models/model.onnx [--sam_checkpoint ...]   # ONNX
    python -m scripts.export --filepath models/model.ts [--sam_checkpoint ...]     # TorchScript

- ONNX (dynamic batch), checked against PyTorch with onnxruntime when it is installed;
- TorchScript (``.ts`` or ``.pt``; never onto ``model_path``, the prompts), traced (SAM's modules are
  not scriptable), any batch size.

Either file carries the training's preprocessing recipe (``scripts.engine.recipe``, as recorded
in model.pt) as JSON under ``ptsam_recipe``, and what the network takes and gives under
``ptsam_io`` (see ``io_description``): the same two strings, in the ONNX file's
``metadata_props`` and as TorchScript extra files, beside MONAI's ``metadata.json``::

    extra = {"ptsam_recipe": "", "ptsam_io": ""}
    net = torch.jit.load("model.ts", _extra_files=extra)   # fills extra; json.loads each

MONAI's ``python -m monai.bundle ckpt_export network_def --use_trace True ...`` traces the same
network, but its file records neither (only ``inference.yaml``, whose recipe knobs are null).

What either export computes is the network alone, on images prepared as the bundle prepares
them; a deployment without the bundle must do the same, or it gets labels for other inputs
than the prompts learned, with no error:

- intensities mapped to 0..255 as the recipe says (``intensity``, ``a_min``/``a_max``), three
  channels (``channels``), a volume cut into 2D slices along ``slice_axis``;
- the longest side resized to S (``scale: resize``; with ``scale: native`` the image keeps its
  size and S x S tiles go through the network by a sliding window), normalised with SAM's
  pixel mean and std, padded with zeros at the bottom and right to S x S;
- out: one logit map per class (each class its own sigmoid); the label is class c + 1 where
  its logit is highest and positive, else 0; crop the padding off and resize back.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .engine.distributed import unwrap
from .model.prompt_file import RECIPE_KEY, load_prompts
from .model.runtime import EXPORT_QUERY_CHUNK, write_onnx
from .model.sam import PIXEL_MEAN, PIXEL_STD

logger = logging.getLogger(__name__)


IO_KEY = "ptsam_io"


def io_description(network: torch.nn.Module, recipe: dict[str, Any]) -> dict[str, Any]:
    """What the exported network takes and gives (the module docstring says it in words)."""
    return {
        "input": "image (B, 3, S, S) float32: intensities mapped to 0..255 by the recipe, longest side "
        "resized to S (scale 'resize'; 'native': S x S tiles of a sliding window), (x - pixel_mean) / "
        "pixel_std, zero-padded at the bottom and right",
        "image_size": network.img_size,
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "output": "pred (B, num_classes, S, S) float32 logits, one sigmoid per class; label = class c + 1 "
        "where its logit is highest and > 0, else 0",
        "class_names": recipe["class_names"],
        "classes": recipe["classes"],
    }


def _parser(config_file: str, overrides: dict[str, Any]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update({"device": "$torch.device('cpu')", **overrides})
    return parser


def build_network(config_file: str = "configs/inference.yaml", **overrides: Any) -> torch.nn.Module:
    """The configured network with its trained prompts (``model_path``) loaded, on the CPU, in eval mode."""
    parser = _parser(config_file, overrides)
    network = unwrap(parser.get_parsed_content("network_def"))
    load_prompts(network, parser.get_parsed_content("model_path"))
    return network.eval()


def trained_recipe(config_file: str = "configs/inference.yaml", **overrides: Any) -> dict[str, Any]:
    """The recipe recorded in ``model_path``, checked against the knobs given (see ``as_trained``)."""
    return _parser(config_file, overrides).get_parsed_content("recipe")


def add_metadata(filepath: str | Path, entries: dict[str, str]) -> None:
    """Key-value strings in an ONNX file's ``metadata_props``."""
    import onnx

    model = onnx.load(str(filepath))
    for key, value in entries.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(filepath))


def export_onnx(network: torch.nn.Module, filepath: str | Path, example_batch: int = 2) -> Path:
    """Write ``network`` as ONNX with a dynamic batch axis (the example batch is 2: a batch of 1
    would be specialised to 1), global attention in query chunks as the CPU fast path exports it."""
    filepath = Path(filepath)
    filepath.parent.mkdir(parents=True, exist_ok=True)
    size = network.img_size
    network.query_chunk = EXPORT_QUERY_CHUNK
    try:
        write_onnx(network, torch.randn(example_batch, 3, size, size), filepath, "pred")
    finally:
        network.query_chunk = None
    return filepath


def onnx_difference(network: torch.nn.Module, filepath: str | Path, batch: int = 3) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's output on one random batch."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(filepath), providers=["CPUExecutionProvider"])
    image = torch.randn(batch, 3, network.img_size, network.img_size)
    with torch.no_grad():
        expected = network(image).numpy()
    return float(np.abs(session.run(None, {"image": image.numpy()})[0] - expected).max())


def export_entries(network: torch.nn.Module, recipe: dict[str, Any]) -> dict[str, str]:
    """What every export records beside the network: the recipe and the input contract, as JSON."""
    return {
        RECIPE_KEY: json.dumps(recipe, sort_keys=True),
        IO_KEY: json.dumps(io_description(network, recipe), sort_keys=True),
    }


TORCHSCRIPT_SUFFIXES = (".ts", ".pt")


def export_torchscript(
    network: torch.nn.Module,
    filepath: str | Path,
    entries: dict[str, str],
    meta_values: dict[str, Any] | None = None,
    example_batch: int = 2,
) -> Path:
    """Write ``network`` traced as TorchScript, with ``entries`` as extra files (read back with
    ``torch.jit.load(path, _extra_files=...)``) and ``meta_values`` as MONAI's ``metadata.json``."""
    from monai.data.torchscript_utils import save_net_with_metadata

    filepath = Path(filepath)
    filepath.parent.mkdir(parents=True, exist_ok=True)
    size = network.img_size
    with torch.no_grad(), warnings.catch_warnings():
        # the input size is fixed (as in the ONNX file) and traced as a constant; the batch is not
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(network, torch.randn(example_batch, 3, size, size))
    extra = {k: v.encode() for k, v in entries.items()}
    save_net_with_metadata(traced, str(filepath), meta_values=meta_values, more_extra_files=extra)
    return filepath


def torchscript_difference(network: torch.nn.Module, filepath: str | Path, batch: int = 3) -> float:
    """Largest absolute difference between the TorchScript file's and PyTorch's output on one random batch."""
    loaded = torch.jit.load(str(filepath))
    image = torch.randn(batch, 3, network.img_size, network.img_size)
    with torch.no_grad():
        return float((loaded(image) - network(image)).abs().max())


def _bundle_metadata(config_file: str) -> dict[str, Any] | None:
    path = Path(config_file).parent / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _refuse_before_export(filepath: str, config_file: str, overrides: dict[str, Any]) -> None:
    """A knob the config does not define (a typo would be ignored, exporting other prompts), an
    export onto the trained prompts (``--filepath models/model.pt``: ``.pt`` means TorchScript
    here), and no trained prompts yet (said as inference says it)."""
    from monai.bundle import ConfigParser

    from .common.options import OptionError, override_problems
    from .engine.handlers import require_prompts

    unknown = override_problems(ConfigParser.load_config_files(config_file), overrides)
    if unknown:
        raise OptionError(f"unknown knob(s), defined by none of {config_file}:\n  " + "\n  ".join(unknown))
    model_path = Path(_parser(config_file, overrides).get_parsed_content("model_path"))
    if Path(filepath).resolve() == model_path.resolve():
        raise ValueError(
            f"--filepath {filepath} is the trained prompts' file (model_path): the export would replace "
            "it; name another file, e.g. models/model.ts"
        )
    require_prompts(model_path)


def main(filepath: str = "models/model.onnx", config_file: str = "configs/inference.yaml", **overrides: Any) -> str:
    """Export to ONNX, or to TorchScript when ``filepath`` ends in .ts or .pt."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torchscript = Path(filepath).suffix in TORCHSCRIPT_SUFFIXES
    if not torchscript and Path(filepath).suffix != ".onnx":
        raise ValueError(f"--filepath {filepath}: name an .onnx file, or a .ts / .pt file for TorchScript")
    _refuse_before_export(filepath, config_file, overrides)
    network = build_network(config_file, **overrides)
    recipe = trained_recipe(config_file, **overrides)
    entries = export_entries(network, recipe)
    if torchscript:
        path = export_torchscript(network, filepath, entries, _bundle_metadata(config_file))
        logger.info("TorchScript vs PyTorch: max |difference| %.2e", torchscript_difference(network, path))
        return str(path)
    path = export_onnx(network, filepath)
    add_metadata(path, entries)
    try:
        logger.info("onnxruntime vs PyTorch: max |difference| %.2e", onnx_difference(network, path))
    except ImportError:
        logger.info("onnxruntime is not installed: the export was not checked")
    return str(path)


if __name__ == "__main__":
    import sys

    import fire

    from .common.errors import report

    sys.excepthook = report  # the bundle's checks end in their message, as in `python -m monai.bundle`
    fire.Fire(main)
