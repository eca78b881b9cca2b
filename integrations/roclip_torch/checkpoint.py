"""Checkpoint files of the training-loop helper: naming, discovery, RNG states.

One file per finished epoch, ``epoch_<N>.pt`` with ``N`` the number of epochs completed, written
atomically (a crash mid-write leaves the previous file intact). The newest complete file is the
one to resume from; temporary files of an interrupted write start with a dot and are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

PREFIX = "epoch_"
SUFFIX = ".pt"
_NAME = re.compile(rf"^{PREFIX}(\d+){re.escape(SUFFIX)}$")


def checkpoint_path(folder: str | Path, completed_epochs: int) -> Path:
    """``folder/epoch_<completed_epochs>.pt``."""
    return Path(folder) / f"{PREFIX}{completed_epochs}{SUFFIX}"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(completed_epochs, path)`` of every checkpoint in ``folder``, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the most completed epochs, or None."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints."""
    for _, path in list_checkpoints(folder)[:-keep_last]:
        path.unlink(missing_ok=True)
