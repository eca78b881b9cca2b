"""Epoch checkpoints of the tensor-resident path, and the exact resume from them.

A run of :func:`roclip_kit.train.tensor.train_tensor` given a ``checkpoint_dir`` writes
``epoch_<N>.pt`` after every epoch (``N`` epochs complete), atomically, with everything the
next epoch depends on: the weights, AdamW's moments, the scheduler, every RNG state, RoCLIP's
state (pool, schedule, risk history), the audit's pool mirror and the epochs' records. A run
resumed from one continues bit for bit on a CPU: its weights, pool and per-epoch figures are
those of the run that never stopped. File names, discovery and pruning are
:mod:`roclip_torch.checkpoint`'s, the RNG states :mod:`roclip_plugin.distributed`'s, the writes
:mod:`roclip_plugin.io`'s; only what a tensor run holds is defined here.

A checkpoint also records what the run *is* (its settings, RoCLIP configuration, whether it
defends, a fingerprint of its data): resuming with anything different would silently train a
run that is neither, so it is refused with the fields that differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from roclip_torch.checkpoint import checkpoint_path, latest_checkpoint, prune_checkpoints

from roclip_plugin.config_aliases import renamed_keys
from roclip_plugin.distributed import rng_state
from roclip_plugin.io import StateError, atomic_torch_save, check_output_dir, read_state_file

TRAIN_FORMAT = "roclip_kit.tensor.train/1"
# Settings that say where and how fast a run trains, not what it trains.
NOT_IDENTITY = ("device", "threads")


def run_identity(
    settings: Any, roclip: Any, defend: bool, images: torch.Tensor, captions: list[str]
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: settings, RoCLIP config, the data.

    The data is fingerprinted (row count and SHA-256 of the pixels and captions): a dataset
    rebuilt with another seed has the same size but other rows, and its run is another run.
    """
    pixels = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    texts = hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()
    return {
        "settings": {k: v for k, v in asdict(settings).items() if k not in NOT_IDENTITY},
        "roclip": None if roclip is None else roclip.to_dict(),
        "defend": bool(defend and roclip is not None),
        "data": {"rows": len(captions), "images_sha256": pixels, "captions_sha256": texts},
    }


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``name: saved -> current`` for each differing entry, one level into nested dicts."""
    found = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found += [f"{key}.{item}" for item in _differences(old, new)]
        elif old != new:
            found.append(f"{key}: {old!r} -> {new!r}")
    return found


class TensorCheckpoints:
    """The epoch checkpoints of one tensor run: write after each epoch, find and check on resume.

    Args:
        folder: where ``epoch_<N>.pt`` files go (checked writable now, not after an epoch).
        identity: :func:`run_identity` of this run.
        keep_last: keep only this many newest checkpoints; None keeps all.
    """

    def __init__(
        self, folder: str | Path, identity: Mapping[str, Any], keep_last: int | None = None
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last: {keep_last!r} must be None or >= 1")
        self.folder = check_output_dir(folder, "checkpoint_dir")
        self.identity = dict(identity)
        self.keep_last = keep_last

    def save(self, completed: int, state: Mapping[str, Any]) -> Path:
        """Write ``epoch_<completed>.pt`` (``state`` plus this process's RNG states)."""
        payload = {
            "format": TRAIN_FORMAT,
            "completed_epochs": completed,
            "identity": self.identity,
            "rng": rng_state(),
            **state,
        }
        path = atomic_torch_save(payload, checkpoint_path(self.folder, completed))
        if self.keep_last is not None:
            prune_checkpoints(self.folder, self.keep_last)
        return path

    def load_latest(self) -> tuple[Path, dict[str, Any]]:
        """The newest checkpoint and its content, checked to belong to this run.

        Raises:
            StateError: no checkpoint, a file of another program, or another run's checkpoint;
                the message names the file, what is wrong and what to do.
        """
        path = latest_checkpoint(self.folder)
        if path is None:
            raise StateError(
                f"resume: {self.folder} holds no epoch_<N>.pt checkpoint to resume from; give "
                "the checkpoint_dir of the run to continue, or start without resume"
            )
        state = read_state_file(path, "tensor-path checkpoint")
        found = state.get("format") if isinstance(state, dict) else None
        if found != TRAIN_FORMAT:
            raise StateError(
                f"resume: {path} is not a tensor-path checkpoint (format {found!r}, expected "
                f"{TRAIN_FORMAT!r}); give the checkpoint_dir train_tensor wrote, or start "
                "without resume"
            )
        saved = dict(state["identity"])
        if isinstance(saved.get("roclip"), Mapping):  # a checkpoint of the old names resumes
            saved["roclip"] = renamed_keys(saved["roclip"], what="saved RoCLIP setting")
        drift = _differences(saved, self.identity)
        if drift:
            raise StateError(
                f"resume: {path} belongs to another run ({'; '.join(drift)}); resume with the "
                "settings, RoCLIP configuration and data it was written with, or use a new "
                "checkpoint_dir"
            )
        return path, state
