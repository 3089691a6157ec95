"""Command-line values for on/off knobs: `monai.bundle` passes `--knob false` as the string 'false'."""

from __future__ import annotations

from typing import Any

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
