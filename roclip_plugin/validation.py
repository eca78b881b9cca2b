"""Checks of the arguments of the defense's Python API, in one place.

The loss runs every training step, so its checks are split by cost. Types, shapes, dtypes and
devices are attributes of the tensors: checking them is free and happens on every call. Values
(finiteness, unit norms, the sign of the logit scale) need the numbers, which on a GPU means a
host-device synchronisation; they are checked on the CPU every call, and on other devices on
the first call and on matching steps, which synchronise anyway (the matcher reads its
indices). One reduction reads every value at once, so a checked step pays one sync, not five.

Every refusal is a ``TypeError`` (wrong kind of object) or a ``ValueError`` (wrong value) that
names the argument and says what to pass instead.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Row norms of "normalised" features may differ from 1 by rounding: OpenCLIP normalises in the
# autocast dtype, and bf16 keeps 8 bits of mantissa (a relative error near 0.4% per entry).
NORM_TOLERANCE = 0.05


# -- numbers from Python, NumPy and torch ------------------------------------------------------


def as_integer(value: Any) -> int | None:
    """``value`` as a Python ``int`` if it is an integer of any kind, else None.

    NumPy integers and 0-d integer tensors are integers too (a config built from an array's
    statistics should not fail); booleans and floats, even integral ones, are not.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.dtype.is_floating_point:
            return None
        if value.dtype.is_complex:
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_real(value: Any) -> float | None:
    """``value`` as a Python ``float`` if it is a real number of any kind, else None.

    Accepts ints, floats, NumPy scalars and 0-d real tensors; refuses booleans and complex
    numbers. Finiteness is the caller's business.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.dtype.is_complex:
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def in_interval(
    value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> bool:
    """Whether ``value`` lies in the interval (``low_open``: ``low`` itself excluded)."""
    return (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high
    )


def interval_text(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> str:
    """``[0, 1)`` and the like, for messages."""
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_real(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> float | None:
    """A finite real number in the interval (or None when ``optional``), as a Python float."""
    if value is None and optional:
        return None
    number = as_real(value)
    bounds = {"low_open": low_open, "high_open": high_open}
    if number is None or not math.isfinite(number) or not in_interval(number, low, high, **bounds):
        allowed = f"a number in {interval_text(low, high, **bounds)}"
        raise ValueError(f"{name}: invalid value {value!r}; allowed: {allowed}")
    return number


def check_count(name: str, value: Any, *, low: int = 1, optional: bool = True) -> int | None:
    """An integer ``>= low`` (or None when ``optional``), returned as a Python ``int``."""
    if value is None and optional:
        return None
    number = as_integer(value)
    if number is None or number < low:
        allowed = f"an integer >= {low}" + (" or None" if optional else "")
        raise ValueError(f"{name}: invalid value {value!r}; allowed: {allowed}")
    return number


def check_epoch(epoch: Any) -> int:
    """A 0-based epoch index."""
    number = as_integer(epoch)
    if number is None or number < 0:
        raise ValueError(
            f"epoch: invalid value {epoch!r}; allowed: an integer >= 0 (epochs are 0-based: "
            "0 is the first epoch)"
        )
    return number


def check_run_length(total_epochs: Any, steps_per_epoch: Any) -> tuple[int | None, int | None]:
    """``RoClipDefense``'s run length: positive integers or None (unknown)."""
    return (
        check_count("total_epochs", total_epochs),
        check_count("steps_per_epoch", steps_per_epoch),
    )


# -- the loss ------------------------------------------------------------------------------


def _check_features(name: str, features: Any) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor of shape [batch, dim], got {type(features).__name__}"
        )
    if features.ndim != 2:
        raise ValueError(f"{name}: expected shape [batch, dim], got {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise ValueError(
            f"{name}: dtype {features.dtype} is not a floating-point type; pass the model's "
            "embeddings (float32, bf16 or fp16)"
        )
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(
            f"{name}: empty tensor of shape {tuple(features.shape)}; a step needs "
            "at least one pair with a non-empty embedding"
        )
    return features


def _check_scale_kind(logit_scale: Any) -> None:
    if isinstance(logit_scale, torch.nn.Parameter):
        raise ValueError(
            "logit_scale: got the model's logit-scale parameter itself, which CLIP stores as a "
            "log; pass its exponential (model.logit_scale.exp()), as OpenCLIP's model does"
        )
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(
                f"logit_scale: expected a scalar (the exponentiated temperature), got shape "
                f"{tuple(logit_scale.shape)}"
            )
        if not logit_scale.dtype.is_floating_point:
            raise ValueError(f"logit_scale: dtype {logit_scale.dtype} is not a floating-point type")
        return
    if as_real(logit_scale) is None:
        raise TypeError(
            f"logit_scale: expected a scalar tensor or a number, got {type(logit_scale).__name__}"
        )


class LossInputCheck:
    """Checks ``RoClipLoss.forward``'s arguments, values only where that costs no extra sync.

    Args:
        tolerance: how far a row norm of the features may be from 1.
    """

    def __init__(self, tolerance: float = NORM_TOLERANCE) -> None:
        self.tolerance = tolerance
        self._values_checked = False

    def __call__(
        self,
        image_features: Any,
        text_features: Any,
        logit_scale: Any,
        *,
        matching: bool = False,
    ) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first bad argument."""
        image = _check_features("image_features", image_features)
        text = _check_features("text_features", text_features)
        if image.shape[0] != text.shape[0]:
            raise ValueError(
                f"image_features has {image.shape[0]} rows but text_features has "
                f"{text.shape[0]}: pass one caption per image (row i of each is one pair)"
            )
        if image.shape[1] != text.shape[1]:
            raise ValueError(
                f"image_features has dim {image.shape[1]} but text_features dim "
                f"{text.shape[1]}: both towers must project to the same embedding width"
            )
        if image.device != text.device:
            raise ValueError(
                f"text_features is on {text.device} but image_features on {image.device}: "
                "move both to one device"
            )
        _check_scale_kind(logit_scale)
        if image.device.type == "cpu" or matching or not self._values_checked:
            self._check_values(image, text, logit_scale)
            self._values_checked = True

    @torch.no_grad()
    def _check_values(self, image: torch.Tensor, text: torch.Tensor, scale: Any) -> None:
        # float64 norms: a huge float32 entry must not overflow into a false "non-finite"
        img = torch.linalg.vector_norm(image.detach().double(), dim=-1)
        txt = torch.linalg.vector_norm(text.detach().double(), dim=-1)
        # Non-finite caption rows are refused like image rows (a NaN caption would reach the
        # plain loss unchecked). Zero rows keep the pool's policy: it refuses them with a
        # warning, so they are exempt from the unit-norm check (NaN == 0 is False: kept).
        txt = torch.where(txt == 0, torch.ones_like(txt), txt)
        parts = [img.amin(), img.amax(), txt.amin(), txt.amax()]
        if isinstance(scale, torch.Tensor):
            parts.append(scale.detach().double().reshape(()).to(img.device))
        values = torch.stack(parts).tolist()  # the one sync
        scale_value = values[4] if isinstance(scale, torch.Tensor) else as_real(scale)
        for name, low, high, norms in (
            ("image_features", values[0], values[1], img),
            ("text_features", values[2], values[3], txt),
        ):
            self._check_norms(name, low, high, norms)
        if scale_value is None or not math.isfinite(scale_value) or scale_value <= 0:
            raise ValueError(
                f"logit_scale: invalid value {scale_value!r}; allowed: a finite number > 0, "
                "the exponentiated temperature (CLIP starts at 1/0.07 = 14.3 and clamps at 100)"
            )

    def _check_norms(self, name: str, low: float, high: float, norms: torch.Tensor) -> None:
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~torch.isfinite(norms)).sum())  # a second sync, only on the way out
            kind = name.split("_")[0]
            raise ValueError(
                f"{name}: {bad} of {norms.shape[0]} {kind} feature rows are non-finite (NaN or "
                "inf); the model diverged or its input is broken (check the learning rate, the "
                "precision and the data)"
            )
        if low < 1 - self.tolerance or high > 1 + self.tolerance:
            raise ValueError(
                f"{name}: rows are not L2-normalised (norms from {low:.4g} to {high:.4g}; "
                f"expected 1 +- {self.tolerance:g}): normalise them with "
                "F.normalize(x, dim=-1), as CLIP models do before the loss"
            )


# -- saved state ----------------------------------------------------------------------------

DEFENSE_STATE_KEYS = (
    "version",
    "config",
    "pool",
    "schedule",
    "epoch",
    "step",
    "unit",
    "matching",
    "alignment_pending",
)
POOL_STATE_KEYS = ("size", "dim", "features", "total_written", "rejected")


def check_state_keys(state: Any, keys: tuple[str, ...], what: str) -> Mapping[str, Any]:
    """``state`` as a mapping holding every one of ``keys``; a ``StateError`` otherwise."""
    from roclip_plugin.io import StateError

    if not isinstance(state, Mapping):
        raise StateError(f"{what}: expected a dict, got {type(state).__name__}")
    missing = [key for key in keys if key not in state]
    if missing:
        raise StateError(
            f"{what} lacks {', '.join(repr(k) for k in missing)}: it was not written by "
            "roclip-plugin's state_dict(), or it was written by another version"
        )
    return state


def check_defense_state(state: Any, version: int) -> Mapping[str, Any]:
    """A ``RoClipDefense.state_dict()`` of ``version`` with every entry (else ``StateError``)."""
    from roclip_plugin.io import StateError

    if isinstance(state, Mapping) and state.get("version") != version:
        raise StateError(
            f"RoCLIP state version {state.get('version')!r} is not supported (expected "
            f"{version}); was the checkpoint written by roclip-plugin?"
        )
    return check_state_keys(state, DEFENSE_STATE_KEYS, "RoCLIP state")


# -- command-line values ------------------------------------------------------------------


def check_device(value: Any, flag: str = "--device") -> str:
    """A torch device string that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    Checked before any work, so ``--device cuda`` on a machine without a GPU fails in a second
    with the fix, not in a traceback after the data were built.
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{flag} {value!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return str(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {value}: no CUDA device is visible; use {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{flag} {value}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
        return str(value)
    if device.type == "mps" and torch.backends.mps.is_available():
        return str(value)
    raise ValueError(f"{flag} {value}: no {device.type} device is available here; use cpu or cuda")


def path_arg(text: str) -> Path:
    """The argparse type of path flags: ``Path("")`` would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or directory name")
    return Path(text)


def empty_value_error(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> str | None:
    """The message for the first option of ``parser`` given no value in ``namespace``, or None.

    argparse (3.11) stores ``--seed=--`` as ``[]`` without calling the flag's type, and
    ``--name=`` or ``--name ''`` as ``""``: either reached the command as a value (``--seed=--``
    ended in ``'<' not supported between 'list' and 'int'``, ``--logs=`` wrote into the current
    folder). An option whose value is empty while its default is not was given empty by the
    user; options whose default is empty (OpenCLIP's ``--pretrained ''``) keep it.
    """
    for action in parser._actions:
        if not action.option_strings or action.nargs in (0, "*"):
            continue
        value = getattr(namespace, action.dest, None)
        if value == action.default:
            continue
        values = value if isinstance(action, argparse._AppendAction) else [value]
        for item in values or ():
            items = item if isinstance(item, list) and action.nargs not in (None, "?") else [item]
            if item == [] or any(isinstance(i, str) and not i for i in items):
                got = "--" if item == [] else ""
                return f"argument {'/'.join(action.option_strings)}: expected a value, got '{got}'"
    return None


def check_parsed(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
    """Refuse an option given no value (``--flag=--``, ``--flag=``): see ``empty_value_error``.

    Walks the parser and the chosen sub-command's, and exits 2 through ``parser.error`` with
    one line naming the flag, as argparse does for its own errors.
    """
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = getattr(namespace, action.dest, None)
                if chosen in action.choices:
                    parsers.append(action.choices[chosen])
        message = empty_value_error(current, namespace)
        if message:
            current.error(message)
