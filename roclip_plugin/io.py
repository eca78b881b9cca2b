"""Files: writes that survive a crash, state files read with errors that name them.

Also the path checks every command runs before it writes anything, so a bad ``--out`` or
``--json`` fails in a second with its flag named, not after minutes of work.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import torch


class StateError(ValueError):
    """A state file or state dict that cannot be restored; the message names it and the fix."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash (or a full disk) during the write leaves the previous file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(target)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) beside ``path``, then rename it over ``path``.

    A failure mid-write (a full disk, an interrupt) leaves the previous file as it was.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` beside ``path``, then rename it over ``path``.

    For files a later run trusts as complete (a scan's embedding chunks and its progress
    record): a stop mid-write leaves either the previous file or none, never a torn one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _temp_beside(target: Path) -> tuple[int, str]:
    """A temporary file in ``target``'s folder, with the mode ``open()`` would give ``target``.

    ``mkstemp`` creates its files 0600 whatever the umask; renamed over ``target`` they would
    make state files and reports unreadable to the user's group and tools, unlike every other
    output. The umask is read by setting it and putting it straight back.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
    except (OSError, AttributeError):  # no fchmod (Windows): keep mkstemp's mode
        pass
    return fd, tmp


def require_file(path: str | os.PathLike[str] | None, what: str) -> Path:
    """``path`` as a ``Path`` to an existing file; a ``ValueError`` that says why not.

    Args:
        path: the path given.
        what: how to name it in the message, with its flag (``"--checkpoint"``,
            ``"classes file (--classes)"``).
    """
    if path is None or str(path) == "":
        raise ValueError(f"{what}: an empty path; give a file")
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{what} {target} is a directory; give a file")
    if not target.exists():
        raise ValueError(f"{what} {target} does not exist")
    if not target.is_file():
        raise ValueError(f"{what} {target} is not a regular file")
    return target


def check_output_file(path: str | os.PathLike[str] | None, flag: str) -> Path | None:
    """Refuse, before any work, an output file that could not be written.

    Checked: a non-empty path, not a directory, and no existing ancestor that is a file (the
    missing folders are created when writing). None passes through (no output asked for).
    """
    if path is None:
        return None
    if str(path) == "":
        raise ValueError(f"{flag}: an empty path; give a file name")
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {target} is a directory; give a file name inside it")
    _check_ancestors(target, flag)
    return target


def check_output_dir(path: str | os.PathLike[str] | None, flag: str) -> Path:
    """Refuse an output directory that could not be made or written.

    Refused: an empty path, a file, a path under a file, an existing folder that is not
    writable, or one under a folder that is not.
    """
    if path is None or str(path) == "":
        raise ValueError(f"{flag}: an empty path; give a directory (e.g. {flag} out)")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {target} is a file, not a directory; choose a new directory")
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {target} is not writable; choose a folder you can write to")
    _check_ancestors(target, flag)
    return target


def _check_ancestors(target: Path, flag: str) -> None:
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {target}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {target}: {parent} is not writable")
            return


def read_state_file(
    source: str | os.PathLike[str] | IO[bytes], what: str, *, name: str | None = None
) -> Any:
    """``torch.load`` a state file of this project, with errors that name the file.

    ``weights_only=False`` because these files hold RNG states (NumPy, Python) that the safe
    loader refuses; load only files this project wrote. An empty, truncated or foreign file
    raises :class:`StateError` (unpickling errors have no common base class).

    Args:
        source: the file, or a binary file object (a remote file opened through fsspec).
        what: how to name the file in errors.
        name: how to name ``source`` in errors (default: the path).
    """
    if isinstance(source, str | os.PathLike):
        source = require_file(source, what)
        if source.stat().st_size == 0:
            raise StateError(f"{what} {source} is empty (an interrupted save?); use another one")
    label = name or source
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StateError(
            f"{what} {label} cannot be read ({reason}): it is truncated, corrupt or not a "
            "file written by roclip-plugin"
        ) from None


def load_versioned(
    source: str | os.PathLike[str] | IO[bytes],
    expected: object,
    what: str,
    *,
    name: str | None = None,
) -> dict[str, Any]:
    """Load a state file written by roclip-plugin and check its ``"format"`` entry.

    Args:
        source: the file, or a binary file object (a remote file opened through fsspec).
        expected: the format value the caller understands.
        what: how to name the file in the error (e.g. "roclip_torch checkpoint").
        name: how to name ``source`` in the error (default: the path).
    """
    state = read_state_file(source, what, name=name)
    found = state.get("format") if isinstance(state, dict) else None
    if found != expected:
        raise StateError(
            f"{name or source}: not a {what} (format {found!r}, expected {expected!r})"
        )
    return state


def detach_stdout() -> None:
    """Point stdout at ``/dev/null`` after its reader left (``roclip ... | head``).

    Python flushes stdout at exit; without this, the flush into the closed pipe prints a
    ``BrokenPipeError`` traceback after the command already stopped.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a captured or replaced stdout: nothing to do
        pass
