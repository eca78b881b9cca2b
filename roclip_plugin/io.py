"""Checkpoint files that survive a crash mid-write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any

import torch


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash (or a full disk) during the write leaves the previous file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_versioned(
    source: str | os.PathLike[str] | IO[bytes],
    expected: object,
    what: str,
    *,
    name: str | None = None,
) -> dict[str, Any]:
    """Load a state file written by roclip-plugin and check its ``"format"`` entry.

    ``weights_only=False`` because these files hold RNG states (NumPy, Python) that the safe
    loader refuses; load only files this project wrote.

    Args:
        source: the file, or a binary file object (a remote file opened through fsspec).
        expected: the format value the caller understands.
        what: how to name the file in the error (e.g. "roclip_torch checkpoint").
        name: how to name ``source`` in the error (default: the path).
    """
    state = torch.load(source, map_location="cpu", weights_only=False)
    found = state.get("format") if isinstance(state, dict) else None
    if found != expected:
        label = name or source
        raise ValueError(f"{label}: not a {what} (format {found!r}, expected {expected!r})")
    return state
