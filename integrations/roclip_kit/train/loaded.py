"""A model loaded for evaluation, and OpenCLIP imported on demand.

:class:`LoadedModel` is what both ways of getting a model give: a checkpoint read from disk
(:mod:`roclip_kit.train.models`) and a model the tensor path holds in memory
(:func:`roclip_kit.train.tensor.loaded_model`). It lives below both so neither imports the other
for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_INSTALL_HINT = 'pip install "roclip-plugin[openclip]"'


@dataclass
class LoadedModel:
    """A model ready for evaluation: eval mode, its validation transform and its tokenizer."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    name: str
    checkpoint: Path
    device: torch.device
    epoch: int | None = None


def import_open_clip() -> Any:
    """Import OpenCLIP, or say how to install it (it is an optional dependency)."""
    try:
        import open_clip
    except ImportError as err:
        raise ModuleNotFoundError(
            f"evaluating checkpoints needs OpenCLIP, which is not installed: {_INSTALL_HINT}"
        ) from err
    return open_clip
