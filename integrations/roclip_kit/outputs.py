"""Output directories written beside, then moved into place, so a failure damages nothing.

``roclip data`` and ``roclip poison`` write a directory of files that point at each other (a
CSV naming images, a manifest naming the CSV). Writing into the old directory would leave a
mix of old and new files whenever a run fails half-way, e.g. a manifest deleted and a CSV that
names removed images. Instead each run writes a fresh staging directory beside the output,
and only a complete one replaces the old output, by two renames. Files inside record the
final paths (``final / name``), not the staging ones, since the staging folder is renamed.

:func:`replacing` also refuses, before any work, an output that cannot be written (a file, a
path under a file, an unwritable folder) or a directory holding files the command did not
write, which a replacement would delete.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from roclip_plugin.io import check_output_dir


def check_replaceable(
    out: Path, flag: str, command: str, names: Collection[str], ours: Callable[[Path], bool]
) -> Path:
    """Refuse an output directory that cannot be replaced; returns it resolved.

    Args:
        out: the output directory (need not exist).
        flag: the flag that named it, for messages.
        command: the command's name, for messages (``roclip poison``).
        names: the entries the command writes into ``out``.
        ours: whether an existing, non-empty ``out`` holds an earlier output of the command.
    """
    out = check_output_dir(out, flag).resolve()
    if not out.is_dir():
        return out
    entries = sorted(p.name for p in out.iterdir() if not _leftover(p.name, names))
    if not entries:
        return out
    foreign = [name for name in entries if name not in names]
    if foreign or not ours(out):
        listed = foreign or entries
        shown = ", ".join(listed[:5]) + (" ..." if len(listed) > 5 else "")
        raise ValueError(
            f"{flag} {out} holds files not written by {command} ({shown}), which replacing the "
            "output would delete: choose a new or empty directory"
        )
    return out


@contextmanager
def replacing(out: Path, flag: str) -> Iterator[Path]:
    """A fresh staging directory beside ``out`` that replaces ``out`` when the block succeeds.

    On any exception (an interrupt included) the staging directory is removed and ``out`` is
    left exactly as it was. Call :func:`check_replaceable` first.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as err:
        raise ValueError(
            f"{flag} {out}: cannot write in {out.parent} ({err.strerror or err}); choose a "
            "writable directory"
        ) from None
    try:
        os.chmod(staging, _directory_mode(out))
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, out)


def swap_in(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; the old ``out``, if any, is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _leftover(entry: str, names: Collection[str]) -> bool:
    """Whether ``entry`` is a hidden folder this module leaves after a killed run."""
    if entry == PREVIOUS:
        return True
    return any(entry.startswith((f".{n}.partial-", f".{n}.old-")) for n in names)


def _directory_mode(out: Path) -> int:
    """The old output's permissions, else the umask's (``mkdtemp`` makes 0700 folders)."""
    if out.is_dir():
        return stat.S_IMODE(out.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


PREVIOUS = ".previous"  # where :func:`keeping` holds the last output while a new one is made


@contextmanager
def keeping(out: Path, names: Collection[str]) -> Iterator[None]:
    """Move the entries ``names`` of ``out`` aside; put them back if the block fails.

    For outputs made of parts that record each other's paths (the demo's poisoned data, runs
    and results), so they cannot be written beside and renamed: the new parts are written in
    place, and the old ones wait in ``out/.previous``. A failure (an interrupt included)
    removes the new parts and restores the old ones; success deletes them. A run killed
    outright leaves ``.previous``; the next run restores it first, so the last complete
    output is never lost.
    """
    backup = out / PREVIOUS
    if backup.is_dir():  # an earlier run was killed: its previous output is the last complete one
        _restore(out, backup, names)
    backup.mkdir()
    for name in names:
        if (out / name).exists():
            os.rename(out / name, backup / name)
    try:
        yield
    except BaseException:
        _restore(out, backup, names)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _restore(out: Path, backup: Path, names: Collection[str]) -> None:
    """Replace the entries ``names`` of ``out`` (a failed run's parts) by those in ``backup``."""
    for name in names:
        new, old = out / name, backup / name
        if new.is_dir() and not new.is_symlink():
            shutil.rmtree(new)
        elif new.exists() or new.is_symlink():
            new.unlink()
        if old.exists():
            os.rename(old, new)
    shutil.rmtree(backup, ignore_errors=True)
