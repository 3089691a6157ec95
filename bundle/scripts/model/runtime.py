"""The frozen image encoder, with its image-encoder prompts baked in, run by an engine made for
CPUs: the inference fast paths (``encoder_engine``, ``encoder_int8`` and ``encoder_bf16`` of the
network).

- ``torch``: PyTorch as it is (the reference); with ``int8``, its linear layers dynamically
  quantised to int8 (``torch.ao``).
- ``onnxruntime``: the encoder exported once to ONNX and run by ONNX Runtime; with ``int8``,
  its matrix products' weights quantised to int8 by ONNX Runtime's dynamic quantisation.
- ``openvino``: the same ONNX file compiled by OpenVINO, in float32 (its default on CPUs with
  bfloat16 units would change the results); with ``bf16``, in bfloat16 on a CPU whose cores
  compute in it (AVX512-BF16, AMX), refused elsewhere.

float32 engines agree with PyTorch within float rounding; int8 changes the embeddings by a
few per cent, bfloat16 by about one (measured in ``bundle/docs/benchmarks.md``). Exported files
are kept under the PTSAM cache folder, keyed by the weights, the prompts, the encoder's code and
the torch version, so a second run starts at once. The least recently used exports beyond ``PTSAM_ENCODER_CACHE_GB``
(8 by default; ``inf``: never) are removed whenever an export is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..common.files import atomic_folder, cache_root
from ..common.flags import flag
from .encoder import encode_image, encoder_version

logger = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("float32", "int8", "bfloat16")
_EXTRA = {"onnxruntime": "export", "openvino": "openvino"}


def precision_of(int8: Any, bf16: Any = False) -> str:
    """The encoder's precision from the ``encoder_int8`` and ``encoder_bf16`` knobs."""
    int8, bf16 = flag(int8), flag(bf16)
    if int8 and bf16:
        raise ValueError("encoder_int8 and encoder_bf16 both true: each is a precision of the encoder, set one")
    return "int8" if int8 else "bfloat16" if bf16 else "float32"


def check_engine(engine: str, precision: str) -> None:
    """Refuse a combination that does not exist, before anything is built."""
    if engine not in ENGINES:
        raise ValueError(f"encoder_engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"the encoder's precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if engine == "openvino" and precision == "int8":
        raise ValueError(
            "encoder_int8 is not offered with encoder_engine 'openvino' (it ran the int8 model slower than "
            "its own float32, bundle/docs/benchmarks.md); use encoder_engine 'onnxruntime' for int8"
        )
    if precision == "bfloat16" and engine != "openvino":
        raise ValueError(
            f"encoder_bf16 is offered with encoder_engine 'openvino' only, got {engine!r} (PyTorch's bfloat16 "
            "took 1.6 times OpenVINO's, and ONNX Runtime has none on CPUs: bundle/docs/benchmarks.md)"
        )


def require_engine(engine: str, int8: Any, device: Any, bf16: Any = False) -> None:
    """At a workflow's start: the engine exists here, and the network runs on the CPU."""
    precision = precision_of(int8, bf16)
    check_engine(engine, precision)
    if engine == "torch" and precision == "float32":
        return
    if torch.device(device).type != "cpu":
        raise ValueError(
            f"encoder_engine {engine!r} / encoder precision {precision} are CPU paths, but device is {device}; "
            "on a GPU use the defaults (encoder_engine torch, float32) and amp"
        )
    if engine != "torch":
        for module in ("onnx", "onnxscript", engine):  # exporting, then running
            _require(module, engine)
        cache_budget()  # a bad PTSAM_ENCODER_CACHE_GB is refused now, not after the export
    if precision == "bfloat16":
        require_bf16_units()


def require_bf16_units() -> None:
    """OpenVINO runs bfloat16 only on cores that compute in it, and otherwise, asked for it, runs
    float32 without a word: a user who chose bfloat16 for speed is told now instead."""
    ov = _require("openvino", "openvino")
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        raise ValueError(
            f"encoder_bf16: this CPU has no bfloat16 units (OpenVINO finds {', '.join(capabilities)}); "
            "OpenVINO would run float32. Set encoder_bf16 false, or encoder_int8 true with encoder_engine "
            "'onnxruntime' for a faster approximate path"
        )


def _require(module: str, engine: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(
            f"encoder_engine {engine!r} needs the {module!r} package: pip install 'ptsam-bundle[{_EXTRA[engine]}]'"
        ) from err


# Queries per chunk of a global block's attention in the ONNX export. ONNX Runtime and OpenVINO
# run attention as separate operations, each reading and writing the whole (heads, 4096, 4096)
# float matrix of a ViT global block (0.8 GB) in memory; in chunks of 256 each pass holds 1/16
# of it: one ViT-B image peaks at 1.3 GB instead of 3.7 GB, and memory traffic drops (measured
# in docs/benchmarks.md). Smaller chunks made the export much slower.
EXPORT_QUERY_CHUNK = 256


class _Encoder(nn.Module):
    """``encode_image`` with fixed prompts, as one module to export or quantise."""

    def __init__(self, encoder: nn.Module, prompts: torch.Tensor | None, query_chunk: int | None = None):
        super().__init__()
        self.encoder, self.query_chunk = encoder, query_chunk
        self.register_buffer("prompts", prompts, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return encode_image(self.encoder, image, self.prompts, query_chunk=self.query_chunk)


def cache_folder() -> Path:
    return cache_root() / "encoders"


BUDGET_ENV = "PTSAM_ENCODER_CACHE_GB"
_MIN_AGE_S = 3600  # an export used within the hour may be in use by another process: kept


def cache_budget() -> float:
    """Bytes the encoder exports may take (``PTSAM_ENCODER_CACHE_GB``, default 8 GB)."""
    text = os.environ.get(BUDGET_ENV, "").strip() or "8"
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not gb >= 0:  # also NaN
        raise ValueError(f"{BUDGET_ENV}={text!r}: expected a number of GB >= 0, or inf")
    return gb * 2**30


def prune_exports(folder: Path, keep: Sequence[Path], budget: float) -> list[Path]:
    """Remove the least recently used export folders (by modification time, which every use
    refreshes) until ``folder`` holds at most ``budget`` bytes; never those in ``keep`` nor any
    used within the hour. Returns what was removed."""
    exports = []
    for path in folder.glob("encoder_*"):
        if path.is_dir() and path not in keep:
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            exports.append((path.stat().st_mtime, size, path))
    total = sum(size for _, size, _ in exports)
    total += sum(f.stat().st_size for k in keep if k.is_dir() for f in k.iterdir() if f.is_file())
    removed = []
    for mtime, size, path in sorted(exports):
        if total <= budget:
            break
        if time.time() - mtime < _MIN_AGE_S:
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed the encoder export %s (%.0f MB; %s)", path.name, size / 2**20, BUDGET_ENV)
        removed.append(path)
        total -= size
    return removed


class EncoderRuntime:
    """Runs ``encoder`` with ``prompts`` on (B, 3, S, S) float32 CPU images -> (B, 256, S/16, S/16).

    Built for one set of weights and prompts; ``matches`` says whether it still serves them.
    """

    def __init__(
        self,
        engine: str,
        precision: str,
        encoder: nn.Module,
        prompts: torch.Tensor | None,
        weights_key: str,
        img_size: int,
    ):
        check_engine(engine, precision)
        self.engine, self.precision, self.img_size = engine, precision, img_size
        self.key = self.key_of(engine, precision, prompts, weights_key, img_size)
        self.stem = self.key.partition("|")[0]  # what the exported file depends on: not the engine
        self.threads = torch.get_num_threads()
        prompts = None if prompts is None else prompts.detach().clone()
        if engine == "torch":  # PyTorch's fused attention kernel needs no chunks
            module = _Encoder(encoder, prompts).eval()
            self._run = self._torch_int8(module) if precision == "int8" else module
            return
        module = _Encoder(encoder, prompts, EXPORT_QUERY_CHUNK).eval()
        onnx_path = self._export(module, cache_folder())
        self._run = self._onnxruntime(onnx_path) if engine == "onnxruntime" else self._openvino(onnx_path)

    @staticmethod
    def key_of(engine: str, precision: str, prompts: torch.Tensor | None, weights_key: str, img_size: int) -> str:
        code = f"{encoder_version()}|{EXPORT_QUERY_CHUNK}|{torch.__version__}"
        digest = hashlib.sha256(f"{code}|{weights_key}|{img_size}".encode())
        if prompts is not None and prompts.numel():
            tokens = prompts.detach().cpu().float().contiguous()
            digest.update(str(tuple(tokens.shape)).encode())
            digest.update(tokens.numpy())
        return f"{digest.hexdigest()[:20]}|{engine}|{precision}"

    def matches(self, engine: str, precision: str, prompts: torch.Tensor | None, weights_key: str) -> bool:
        return self.key == self.key_of(engine, precision, prompts, weights_key, self.img_size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.device.type != "cpu":
            raise ValueError(
                f"encoder_engine {self.engine!r} runs on the CPU, but the images are on {image.device}; "
                "use encoder_engine 'torch' on a GPU"
            )
        if self.engine == "torch":
            return self._run(image)
        # One image per call: batching bought no speed on a CPU (docs/benchmarks.md), and each image
        # in a call adds its attention chunks to the memory the call holds.
        images = image.float().contiguous().numpy()
        return torch.from_numpy(np.concatenate([np.asarray(self._run(images[i : i + 1])) for i in range(len(images))]))

    @staticmethod
    def _torch_int8(module: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice
            return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)

    def _export(self, module: nn.Module, folder: Path) -> Path:
        """The encoder as ONNX (int8 when asked), exported once and kept in ``folder``."""
        _require("onnx", self.engine)
        fp32 = folder / f"encoder_{self.stem}"
        if not (fp32 / "encoder.onnx").is_file():
            logger.info("exporting the image encoder to ONNX for %s (once): %s", self.engine, fp32)
            example = torch.zeros(2, 3, self.img_size, self.img_size)
            atomic_folder(fp32, lambda tmp: write_onnx(module, example, tmp / "encoder.onnx", "embeddings"))
        used = [fp32]
        if self.precision == "int8":
            used.append(folder / f"encoder_{self.stem}_int8{INT8_TAG}")
            if not (used[-1] / "encoder.onnx").is_file():
                atomic_folder(used[-1], lambda tmp: _quantise(fp32 / "encoder.onnx", tmp / "encoder.onnx"))
        for path in used:
            os.utime(path)  # a use: what the pruning's "least recently used" reads
        prune_exports(folder, used, cache_budget())
        return used[-1] / "encoder.onnx"

    def _onnxruntime(self, path: Path) -> Any:
        ort = _require("onnxruntime", self.engine)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads  # as many as torch uses, not every core
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"image": x})[0]

    def _openvino(self, path: Path) -> Any:
        ov = _require("openvino", self.engine)
        asked = "bf16" if self.precision == "bfloat16" else "f32"
        if asked == "bf16":
            require_bf16_units()
        compiled = ov.Core().compile_model(
            str(path), "CPU", {"INFERENCE_PRECISION_HINT": asked, "INFERENCE_NUM_THREADS": self.threads}
        )
        ran = compiled.get_property("INFERENCE_PRECISION_HINT")
        if ran != getattr(ov.Type, asked):  # a hint OpenVINO may quietly not follow
            raise RuntimeError(f"OpenVINO compiled the encoder in {ran.get_type_name()}, asked for {self.precision}")
        return lambda x: compiled(x)[0]


def write_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, output_name: str) -> None:
    """``module`` as ONNX with a dynamic batch axis, input ``image``. The example batch should
    be 2 or more: a batch of 1 would be fixed at 1. Traced without gradients: with trainable
    image-encoder prompts the traced attention's layout differs from its decomposition's, and
    the export fails."""
    with _quiet("torch.onnx"), warnings.catch_warnings(), torch.no_grad():  # notes on torchvision ops SAM never uses
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["image"],
            output_names=[output_name],
            dynamo=True,
            dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=256)}},
            verbose=False,
        )


# 7-bit weights (reduce_range): without VNNI (AVX2, plain AVX-512) ONNX Runtime's u8 x s8 products
# saturate their 16-bit sums; full-range weights moved ViT-B's embeddings by 15 % on an AVX2 EPYC,
# 3 % with reduce_range, as on a VNNI one. Per-channel scales keep a channel of large weights from
# coarsening the rest. The settings name the export's folder, so a changed recipe is rebuilt.
INT8_TAG = "-w7pc"


def _quantise(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of the matrix products' weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(None):  # it logs advice to pre-process the model, on the root logger, every call
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            use_external_data_format=True,
        )


@contextmanager
def _quiet(name: str | None) -> Iterator[None]:
    """Only errors from logger ``name`` (None: the root logger) while the block runs."""
    target = logging.getLogger(name)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)
