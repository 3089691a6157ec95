"""The workflows' knobs checked before any work: each wrong value named with what is allowed.

A value MONAI's command line passes through unchanged (``--epochs abc`` is the string 'abc')
would otherwise fail far from its cause ("'<' not supported between 'str' and 'int'", "optimizer
got an empty parameter list"). The configs list their knobs in an ``options`` section and the
``initialize`` step calls ``check`` on it first. ``check`` also refuses a command-line override
of an id no config defines (``--epoch 3`` for ``--epochs 3``): MONAI adds such an id silently and
nothing reads it, so the run would go on with the default. A misspelt key under a section is
refused the same way (``--train#trainer#max_epoch 3``: MONAI would pass it to SupervisedTrainer
and stop only when it builds it, after the run has started, with a traceback).
"""

from __future__ import annotations

import copy
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


# What MONAI's ConfigComponent reads itself rather than passing to the target.
_SPECIAL_KEYS = frozenset({"_target_", "_disabled_", "_requires_", "_mode_", "_desc_"})


def override_problems(
    config: Mapping[str, Any], given: Mapping[str, Any] | Sequence[str], also_known: Sequence[str] = ()
) -> list[str]:
    """Each id of ``given`` that would land where nothing reads it, checked against the merged
    ``config`` (MONAI's ``set`` creates missing sections and keys silently): a top-level id none
    of ``config`` and ``also_known`` names (as ``unknown_overrides`` says it), and a nested one
    (``a#b#c``, ``a::b::c``) whose parent is missing, a value, or a list it indexes past, or whose
    leaf is neither a key of its section nor a parameter of the section's ``_target_``. Ids
    under ``_meta_`` (read from the metadata file, free-form) pass. Overrides are applied in
    order, so one may set a section that a later one goes into."""
    from monai.bundle.config_item import ComponentLocator

    tree = copy.deepcopy(dict(config))
    locator = ComponentLocator()  # MONAI's table of its short names (``SupervisedTrainer``)
    found = []
    for key in given:
        parts = str(key).replace("::", "#").split("#")
        if parts[0] == "_meta_" and len(parts) > 1:
            continue
        if len(parts) == 1:
            wrong = unknown_overrides([key], sorted(set(tree) | set(also_known)))
        elif parts[0] not in tree:
            wrong = unknown_overrides([key], sorted(set(tree) | {"_meta_"}))
        else:
            problem = _nested_problem(tree, parts, locator)
            wrong = [f"--{key}: {problem}"] if problem else []
        found += wrong
        if not wrong and isinstance(given, Mapping) and parts[0] in tree:
            _set(tree, parts, given[key])
    return found


def _key(node: dict | list, part: str) -> Any:
    """The key or index of ``node`` that the id part ``part`` names (a YAML key may be an int)."""
    if isinstance(node, list):
        return int(part)
    return next((k for k in node if str(k) == part), part)


def _set(tree: dict, parts: list[str], value: Any) -> None:
    node: Any = tree
    for part in parts[:-1]:
        node = node[_key(node, part)]
    node[_key(node, parts[-1])] = copy.deepcopy(value)


def _suggest(word: str, names: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(word, [n for n in names if n not in _SPECIAL_KEYS], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(f'--{prefix}#{c}' for c in close)}?)" if close else ""


def _nested_problem(tree: Mapping[str, Any], parts: list[str], locator: Any) -> str | None:
    """Why the id ``parts`` (its top level in ``tree``) would be read by nothing, or None."""
    node: Any = tree[parts[0]]
    for depth in range(1, len(parts)):
        here, part, leaf = "#".join(parts[:depth]), parts[depth], depth == len(parts) - 1
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                held = f"indices 0 to {len(node) - 1}" if node else "no items"
                return f"{here} is a list with {held}"
            node = node[int(part)]
        elif isinstance(node, dict):
            keys = [str(k) for k in node]
            if part in keys:
                node = node[_key(node, part)]
            elif not leaf:
                return f"{here} has no {part}" + _suggest(part, keys, here)
            elif "_target_" in node:
                if part in _SPECIAL_KEYS:
                    return None
                names = _parameters(node, here, locator)
                if names is None or part in names:
                    return None
                return f"not a parameter of {node['_target_']}" + _suggest(part, sorted(set(names) | set(keys)), here)
            elif not node or part == "_target_":  # an empty mapping to fill; a section made a component
                return None
            else:
                return f"{here} has no {part}" + _suggest(part, keys, here)
        elif isinstance(node, str) and node.startswith("@"):
            return f"{here} is {node}: set --{node[1:]}#{'#'.join(parts[depth:])} instead"
        else:
            return f"{here} is a value ({node!r}), not a section: there is nothing under it to set"
    return None


def _parameters(section: Mapping[str, Any], here: str, locator: Any) -> set[str] | None:
    """The keyword parameters of the section's ``_target_``, resolved as MONAI resolves it (its
    short names, then a dotted path) without calling anything; None (anything goes) where it
    takes ``**kwargs`` or cannot be resolved so: a reference or expression, or an import that fails."""
    import pydoc
    import warnings

    from monai.bundle.config_item import ConfigComponent

    target = section["_target_"]
    if not isinstance(target, str) or target.startswith(("@", "$", "%")):
        return None
    try:
        with warnings.catch_warnings():  # MONAI warns of an ambiguous short name when it instantiates
            warnings.simplefilter("ignore")
            name = ConfigComponent(dict(section), id=here, locator=locator).resolve_module_name()
        component = pydoc.locate(name)
        signature = inspect.signature(component)  # a class: its __init__'s, without self
    except Exception:  # a target that does not resolve fails where MONAI builds it
        return None
    if component is None:
        return None
    kinds = {p.kind for p in signature.parameters.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n, p in signature.parameters.items() if p.kind in keyword}


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
    """Refuse, before any work, a command-line id that would land where nothing reads it (a typo
    MONAI would keep as a new id): one none of the run's configs defines, and one under a defined
    section that is neither a key there nor a parameter of its ``_target_``
    (``override_problems``). MONAI's own arguments pass."""
    found = _command_line()
    if found is None:
        return
    from monai.bundle import ConfigParser, ConfigWorkflow

    files, given = found
    workflow = set(inspect.signature(ConfigWorkflow.__init__).parameters) - {"self", "override"}
    problems = override_problems(ConfigParser.load_config_files(files), given, sorted(workflow | {"_meta_"}))
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
