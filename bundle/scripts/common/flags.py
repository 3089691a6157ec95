"""Command-line values for on/off knobs: `monai.bundle` passes `--knob false` as the string 'false'."""

from __future__ import annotations

from typing import Any

import torch

_FALSE = {"false", "no", "off", "0", "none", "null", ""}
_TRUE = {"true", "yes", "on", "1"}


def flag(value: Any) -> bool:
    """``True``/``False``, or their spellings on a command line ('false', 'no', 'off', '0', ...)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _FALSE:
            return False
        if text in _TRUE:
            return True
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def optional_flag(value: Any) -> bool | None:
    """Like ``flag``, with None (or 'null', 'none', 'auto') meaning "decide automatically"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "auto")):
        return None
    return flag(value)


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def amp_kwargs(dtype: str = "auto") -> dict[str, torch.dtype]:
    """``torch.autocast`` arguments for the ``amp_dtype`` knob: 'auto' is bfloat16 where the GPU
    has it (Ampere and later: no loss scaling needed, fp32's range) and float16 elsewhere."""
    name = str(dtype).strip().lower()
    if name == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return {"dtype": torch.bfloat16 if bf16 else torch.float16}
    if name not in _AMP_DTYPES:
        raise ValueError(f"amp_dtype must be auto, bfloat16 or float16, got {dtype!r}")
    return {"dtype": _AMP_DTYPES[name]}


def amp_dtype_used(amp: Any, dtype: str = "auto") -> str | None:
    """The autocast dtype a run uses ('bfloat16', 'float16'), None without AMP: what MLflow records."""
    return str(amp_kwargs(dtype)["dtype"]).removeprefix("torch.") if flag(amp) else None
