"""How a failed `python -m monai.bundle` run ends: with the bundle's own message as the last line.

MONAI wraps an error raised while a config is evaluated in "Failed to evaluate ConfigExpression"
and Python prints some 45 lines of traceback over it; a user reads the last line first. When the
chain of errors holds one the bundle raised on purpose (a check of the user's files, options or
checkpoints), only its message is printed; any other error keeps its full traceback, followed by
the first error of the chain again. ``PTSAM_DEBUG=1`` always shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from types import TracebackType

DEBUG_ENV = "PTSAM_DEBUG"
_PACKAGE = Path(__file__).resolve().parents[1]  # bundle/scripts
# What the bundle's checks raise; raised by a bundle frame, they are messages, not bugs.
_CHECKS = (ValueError, TypeError, LookupError, OSError, RuntimeError)


def chain(err: BaseException) -> list[BaseException]:
    """``err`` and what it was raised from, outermost first (MONAI's and Ignite's wrappers first)."""
    found = [err]
    while True:
        nxt = found[-1].__cause__ or (None if found[-1].__suppress_context__ else found[-1].__context__)
        if nxt is None or any(nxt is e for e in found):
            return found
        found.append(nxt)


def _raised_by_the_bundle(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def is_check(err: BaseException) -> bool:
    """Whether ``err`` is a message for the user: raised on purpose by the bundle's own code."""
    return isinstance(err, _CHECKS) and not isinstance(err, NotImplementedError) and _raised_by_the_bundle(err)


def debugging() -> bool:
    """Whether ``PTSAM_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def reason(err: BaseException) -> str:
    """What went wrong, for a user: the bundle's own message where the chain of errors holds one,
    else the first error of the chain with its type (a library's error, or a bug)."""
    errors = chain(err)
    check = next((e for e in errors if is_check(e)), None)
    return str(check) if check is not None else f"{type(errors[-1]).__name__}: {errors[-1]}"


def report(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` for the bundle's command line (see the module doc)."""
    errors = chain(err)
    check = next((e for e in errors if is_check(e)), None)  # the outermost: it may wrap an OSError
    if debugging() or check is None:
        sys.__excepthook__(kind, err, tb)
        last = check or errors[-1]
        if last is not err:
            print(f"\n{type(last).__name__}: {last}", file=sys.stderr)
        return
    print(f"(traceback: rerun with {DEBUG_ENV}=1)\nError: {check}", file=sys.stderr)


def install_for_command_line() -> None:
    """Use ``report`` when this process is `python -m monai.bundle` (not a library user's)."""
    if Path(sys.argv[0]).parts[-2:] == ("bundle", "__main__.py") and sys.excepthook is sys.__excepthook__:
        sys.excepthook = report
