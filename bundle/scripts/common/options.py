"""The workflows' knobs checked before any work: each wrong value named with what is allowed.

A value MONAI's command line passes through unchanged (``--epochs abc`` is the string 'abc')
would otherwise fail far from its cause ("'<' not supported between 'str' and 'int'", "optimizer
got an empty parameter list"). The configs list their knobs in an ``options`` section and the
``initialize`` step calls ``check`` on it first. ``check`` also refuses a command-line override
of an id no config defines (``--epoch 3`` for ``--epochs 3``): MONAI adds such an id silently and
nothing reads it, so the run would go on with the default.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .flags import flag


class OptionError(ValueError):
    """Knobs whose values cannot work; the message names each with what is allowed."""


def _integer(low: int | None = None) -> Callable[[Any], str | None]:
    allowed = "an integer" + (f" >= {low}" if low is not None else "")

    def rule(value: Any) -> str | None:
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or (low is not None and value < low):
            return allowed
        return None

    return rule


def _number(low: float | None = None, high: float | None = None, *, open_low: bool = False, open_high: bool = False):
    if high is not None:
        allowed = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low is not None:
        allowed = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        allowed = "a number"

    def rule(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return allowed
        below = low is not None and (value < low or (open_low and value == low))
        above = high is not None and (value > high or (open_high and value == high))
        return allowed if below or above else None

    return rule


def _choice(*names: str) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        return None if value in names else "one of " + ", ".join(names)

    return rule


def _flag() -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        try:
            flag(value)
        except ValueError:
            return "true or false"
        return None

    return rule


def _names() -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        ok = isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value)
        return None if ok else "a list of non-empty names"

    return rule


def _device() -> Callable[[Any], str | None]:
    """A device that exists here: CPU torch (what ``make setup`` installs without ``nvidia-smi``)
    would otherwise fail deep in building the network ("Torch not compiled with CUDA enabled")."""

    def rule(value: Any) -> str | None:
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            return "a torch device: cpu, cuda, cuda:0, ..."
        if device.type == "cuda" and not torch.cuda.is_available():
            built = (
                f"built for CUDA {torch.version.cuda}, no GPU visible" if torch.version.cuda else "built without CUDA"
            )
            return f"cpu (CUDA is not available here: torch {torch.__version__} is {built})"
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            return f"cpu or cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        return None

    return rule


def _whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def _class_values() -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        ok = isinstance(value, (list, tuple)) and value and all(_whole(v) and v != 0 for v in value)
        return None if ok and len(set(value)) == len(value) else "a list of distinct label values other than 0"

    return rule


def _value_map() -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        ok = isinstance(value, Mapping) and all(_whole(v) for v in value.values())
        ok = ok and all(_whole(k) or (isinstance(k, str) and k.strip().lstrip("-").isdigit()) for k in value)
        return None if ok else "a mapping of label values to label values, for example {255: 1}"

    return rule


def _regex() -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        if not isinstance(value, str) or not value:
            return "a regular expression (a non-empty string) or null"
        try:
            re.compile(value)
        except re.error as err:
            return f"a regular expression; this one does not compile ({err})"
        return None

    return rule


RULES: dict[str, Callable[[Any], str | None]] = {
    "epochs": _integer(1),
    "batch_size": _integer(1),
    "learning_rate": _number(0),  # 0: a frozen baseline run
    "weight_decay": _number(0),
    "warmup_epochs": _integer(0),
    "val_interval": _integer(1),
    "early_stop_patience": _integer(0),
    "n_md_prompts": _integer(0),
    "n_ie_prompts": _integer(0),
    "num_classes": _integer(1),
    "class_names": _names(),
    "classes": _class_values(),
    "label_map": _value_map(),
    "slices_per_volume": _integer(1),
    "fg_fraction": _number(0, 1),
    "test_fraction": _number(0, 1, open_high=True),
    "val_fraction": _number(0, 1, open_high=True),
    "split_group": _regex(),
    "max_voxels": _integer(1),
    "sw_overlap": _number(0, 1, open_high=True),
    "cache_ram_mb": _number(0),
    "seed": _integer(),
    "system_metrics_interval": _number(0),
    "a_min": _number(),
    "a_max": _number(),
    "intensity": _choice("auto", "window", "percentile", "none"),
    "scale": _choice("resize", "native"),
    "layout": _choice("display", "stored"),
    "sw_blend": _choice("gaussian", "constant"),
    "cache_dtype": _choice("float32", "float16"),
    "encoder_engine": _choice("torch", "onnxruntime", "openvino"),
    "n_overlays": _integer(0),
    "eval_section": _choice("test", "validation", "training"),
    "device": _device(),
    "allow_other_kind": _flag(),
}


def problems(options: Mapping[str, Any]) -> list[str]:
    """Every knob of ``options`` that breaks its rule, as '--knob value: allowed'. A null value is
    left to its workflow (null means "as trained" or "automatic" where a config allows it)."""
    found = []
    for knob, value in options.items():
        allowed = None if value is None else RULES[knob](value)
        if allowed:
            found.append(f"--{knob} {value!r}: expected {allowed}")
    md, ie, count = options.get("n_md_prompts"), options.get("n_ie_prompts"), options.get("num_classes")
    if md == 0 and ie == 0:
        found.append("--n_md_prompts 0 with --n_ie_prompts 0: no prompt tokens, nothing to learn or apply")
    elif md == 0 and isinstance(count, int) and count > 1:
        found.append(
            f"--n_md_prompts 0 with --num_classes {count}: the classes differ only by their mask-decoder "
            "tokens; without them every class gets the same mask"
        )
    if found:  # the checks below compare knobs that are each right
        return found
    lo, hi = options.get("a_min"), options.get("a_max")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo >= hi:
        found.append(f"--a_min {lo!r} with --a_max {hi!r}: the CT window needs a_min < a_max")
    return found + _class_problems(options)


def _class_problems(options: Mapping[str, Any]) -> list[str]:
    """``class_names`` and ``classes`` (one per class) against ``num_classes``, and ``label_map``'s
    values against ``classes``: each mismatch would train or score a class on the wrong pixels."""
    found = []
    count, names, classes = options.get("num_classes"), options.get("class_names"), options.get("classes")
    if isinstance(names, (list, tuple)) and isinstance(count, int) and len(names) != count:
        found.append(f"--class_names {list(names)!r}: {len(names)} name(s) for --num_classes {count}")
    if isinstance(classes, (list, tuple)) and isinstance(count, int) and len(classes) != count:
        found.append(f"--classes {list(classes)!r}: {len(classes)} label value(s) for --num_classes {count}")
    label_map = options.get("label_map")
    if isinstance(classes, (list, tuple)) and isinstance(label_map, Mapping):
        stray = sorted({v for v in label_map.values() if v != 0 and v not in classes})
        if stray:
            found.append(
                f"--label_map {dict(label_map)!r}: maps to {stray}, neither background (0) nor among "
                f"--classes {list(classes)!r}"
            )
    return found


def unknown_overrides(given: Mapping[str, Any] | Sequence[str], known: Sequence[str]) -> list[str]:
    """Each id of ``given`` whose top-level part (before ``#``) is not in ``known``, as
    '--id', with the closest known names as a suggestion."""
    found = []
    for key in given:
        top = str(key).replace("::", "#").split("#")[0]
        if top in known:
            continue
        close = difflib.get_close_matches(top, [k for k in known if not k.startswith("_")], n=2, cutoff=0.75)
        found.append(f"--{key}" + (f" (did you mean {' or '.join('--' + c for c in close)}?)" if close else ""))
    return found


def _command_line() -> tuple[Any, Mapping[str, Any]] | None:
    """(config files, overrides) of the ``monai.bundle`` run (``run``, ``run_workflow``) being
    initialised, read from MONAI's ``create_workflow`` up the stack; None where the workflow was
    made otherwise (MONAI Label, MONAI FL, a test's ``ConfigParser``), which pass no typed ids."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "create_workflow" and frame.f_globals.get("__name__") == "monai.bundle.scripts":
            args = frame.f_locals.get("_args")
            files = frame.f_locals.get("config_file")
            return (files, args) if isinstance(args, Mapping) and files else None
        frame = frame.f_back
    return None


def check_overrides() -> None:
    """Refuse, before any work, a command-line id that none of the run's configs defines (a typo
    MONAI would keep as a new id that nothing reads). Ids under a defined one (``train#...``) and
    MONAI's own arguments pass."""
    found = _command_line()
    if found is None:
        return
    from monai.bundle import ConfigParser, ConfigWorkflow

    files, given = found
    known = set(ConfigParser.load_config_files(files)) | {"_meta_"}
    known |= set(inspect.signature(ConfigWorkflow.__init__).parameters) - {"self", "override"}
    problems = unknown_overrides(given, sorted(known))
    if problems:
        raise OptionError(
            "unknown knob(s) on the command line, defined by none of the configs:\n  " + "\n  ".join(problems)
        )


def check(options: Mapping[str, Any]) -> None:
    """Raise ``OptionError`` naming every wrong knob, before any work: command-line ids no config
    defines, then values each knob's rule refuses."""
    check_overrides()
    unknown = sorted(set(options) - set(RULES))
    if unknown:
        raise TypeError(f"no rule for the knobs {unknown} (scripts.common.options.RULES)")
    found = problems(options)
    if found:
        raise OptionError("invalid option(s):\n  " + "\n  ".join(found))
