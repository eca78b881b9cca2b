"""Getting CLIP features and the logit scale out of an arbitrary PyTorch model.

In-house models differ in small ways: some return features from ``forward`` (OpenCLIP returns
a dict, older code a tuple), some expose ``encode_image`` / ``encode_text``, some normalise,
some store the temperature as ``log(1 / T)`` (CLIP's ``logit_scale`` parameter). These
helpers absorb the differences so that :class:`~roclip_torch.adapter.RoClipAdapter` needs one
code path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LogitScaleSource = torch.Tensor | float | Callable[[], torch.Tensor | float]


@dataclass(frozen=True)
class ModelOutput:
    """Features read off a model's ``forward``; ``logit_scale`` is exponentiated, or None."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor | None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers.

    Attributes such as ``encode_image`` or ``logit_scale`` live on the inner module; the
    wrapper is still what ``forward`` must go through (see :func:`uses_forward`).
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_data_parallel(model: nn.Module) -> bool:
    """Whether ``model`` is a (Distributed)DataParallel wrapper."""
    return isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def uses_forward(model: nn.Module) -> bool:
    """Whether features must come from ``model(images, texts)`` rather than ``encode_*``.

    A DDP wrapper only synchronises gradients of a backward pass that started from its own
    ``forward``: calling ``model.module.encode_image`` would silently train each rank on its own
    gradients. Models without ``encode_image`` / ``encode_text`` have nothing else to call.
    """
    inner = unwrap(model)
    has_encoders = callable(getattr(inner, "encode_image", None)) and callable(
        getattr(inner, "encode_text", None)
    )
    return is_data_parallel(model) or not has_encoders


def parse_model_output(output: Any) -> ModelOutput:
    """Read features from what a CLIP-style ``forward`` returns.

    Accepted forms, as OpenCLIP and most CLIP codebases return them: a mapping with keys
    ``image_features``, ``text_features`` and optionally ``logit_scale``; or a sequence
    ``(image_features, text_features[, logit_scale, ...])``. The logit scale of a ``forward``
    is taken as already exponentiated (OpenCLIP's convention).

    Raises:
        TypeError: for any other form, naming what was received.
    """
    if isinstance(output, Mapping):
        if "image_features" in output and "text_features" in output:
            return ModelOutput(
                output["image_features"], output["text_features"], output.get("logit_scale")
            )
        raise TypeError(
            "model output mapping lacks 'image_features' / 'text_features' (keys: "
            f"{sorted(output)}); pass encode_image= and encode_text= to RoClipAdapter instead"
        )
    if isinstance(output, Sequence) and len(output) >= 2:
        scale = output[2] if len(output) >= 3 else None
        return ModelOutput(output[0], output[1], scale)
    raise TypeError(
        f"cannot read CLIP features from a model output of type {type(output).__name__}; "
        "expected a dict with image_features/text_features or a tuple (image, text[, scale])"
    )


def model_device(model: nn.Module | None) -> torch.device | None:
    """Device of the model's first parameter (or buffer); None when it has neither."""
    if model is None:
        return None
    for tensor in (*unwrap(model).parameters(), *unwrap(model).buffers()):
        return tensor.device
    return None


def read_logit_scale(source: LogitScaleSource) -> torch.Tensor | float:
    """The current value of a logit-scale source (a tensor, a number, or a callable)."""
    return source() if callable(source) else source


def as_scale_tensor(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on ``like``'s device; keeps autograd when ``value`` is a tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device).reshape(())
    return torch.tensor(float(value), device=like.device)
