"""Files a run writes: atomic writes (a file is written beside its target under a temporary name,
then renamed, so an interrupted run never leaves a half-written model.pt, resume state, label or
report), with the mode the user's umask gives; output folders checked before any work; one
training at a time per checkpoint folder; working folders that say whether the process using
them is still alive."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see lock_folder
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's files are 0600


def cache_root() -> Path:
    """Where PTSAM keeps what it can rebuild (exported encoders, the demo's generalist):
    ``$PTSAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ptsam``, else ``~/.cache/ptsam``."""
    root = os.environ.get("PTSAM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptsam"
    return Path(root)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (same suffix, so writers that pick
    the format by name still work), then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)  # colleagues sharing the folder read results as with any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a new temporary folder beside ``path``, then rename it to ``path``:
    files that belong together (an ONNX model and its external data) appear all at once. If
    another process got there first, its folder is kept and ours dropped."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        for child in tmp.iterdir():
            os.chmod(child, _FILE_MODE)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through ``atomic_write``."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_writable(**folders: str | Path) -> None:
    """Before any data is read, that each folder (named by its knob) can be written, or created
    where it does not exist yet; nothing is created here (a run refused later leaves no trace).
    An unwritable folder would otherwise fail only when the first result is saved."""
    for knob, folder in folders.items():
        folder = Path(folder).absolute()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
            if existing == folder:
                tempfile.TemporaryFile(dir=folder).close()  # also catches read-only file systems
            elif not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, f"no permission to create folders in {existing}")
        except OSError as err:
            raise PermissionError(f"{knob}={folder}: cannot write there ({err.strerror or err})") from err


_LOCKS: dict[Path, int] = {}  # folder -> open lock file, held until the process ends


def lock_folder(folder: str | Path, what: str = "a training") -> Path:
    """Hold ``<folder>/.lock`` for the rest of this process, or refuse if another process holds it.
    The lock is the kernel's (``flock``): a crashed or killed run leaves nothing stuck. Taking it
    again in the same process (federated rounds) is allowed. Without ``fcntl`` (Windows) a no-op."""
    folder = Path(folder).resolve()
    if fcntl is None or folder in _LOCKS:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        holder = Path(folder / ".lock").read_text().strip() or "another process"
        raise RuntimeError(
            f"{folder} is in use by {what} still running ({holder}): its model.pt and resume state would be "
            "overwritten. Wait for it, or give this run another ckpt_dir."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()}".encode())
    _LOCKS[folder] = fd
    return folder


def held_folder(parent: str | Path, prefix: str) -> tuple[Path, int | None]:
    """A new folder in ``parent``, named ``prefix`` and a random part, held by this process until
    ``release_folder`` or its end (the kernel's ``flock`` on the folder: a killed process holds it no
    more), so that ``remove_unheld`` never takes a folder still in use. Without ``fcntl``
    (Windows) it is not held: the descriptor is None."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if fcntl is None:
        return folder, None
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: nobody else holds it yet
    return folder, fd


def release_folder(folder: str | Path, fd: int | None) -> None:
    """Remove a ``held_folder``, then let it go."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    if fd is not None:
        os.close(fd)


def remove_unheld(parent: str | Path, prefix: str) -> list[Path]:
    """Remove the folders ``prefix*`` in ``parent`` that no process holds (``held_folder``): left by
    a process that was killed, or by a bundle from before they were held. Returns them. Without
    ``fcntl`` (Windows) whether one is in use cannot be told: nothing is removed."""
    import shutil

    removed: list[Path] = []
    if fcntl is None or not Path(parent).is_dir():
        return removed
    for folder in sorted(Path(parent).glob(f"{prefix}*")):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            if not folder.is_dir():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    continue  # in use
                raise
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed
