"""The old names of RoCLIP settings, kept working as deprecated aliases.

The schedule's names drifted: ``first_rematch_epoch`` and ``rematch_every`` said "re-match"
and ``pool_update=matching_epochs`` said "matching epoch", while the default preset (``robust``)
drops or splits the risky pairs and re-matches nothing. The settings now say what every
``match_action`` does: the schedule picks *defended epochs* (or step blocks). Configurations,
scripts and checkpoints written with the old names must keep working, so each old name is
translated here, with a :class:`FutureWarning` (shown by default, unlike a
``DeprecationWarning``) that names the new one. One table serves keyword arguments, dict and
JSON keys, saved checkpoint state and ``--roclip-*`` flags, so no entry point can miss one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

# old field name -> new field name (``first_match_epoch`` is the name before the re-match one)
FIELD_ALIASES: dict[str, str] = {
    "first_rematch_epoch": "first_defended_epoch",
    "first_match_epoch": "first_defended_epoch",
    "rematch_every": "defend_every",
}
# field -> {old value -> new value}
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "pool_update": {"matching_epochs": "defended_epochs"},
}


# Frames a warning skips, so that it points at the caller's line that used the old name.
_INTERNAL = {__file__, str(Path(__file__).with_name("config.py"))}
_INTERNAL |= {dataclasses.__file__, argparse.__file__}


def warn_renamed(old: str, new: str, what: str = "RoCLIP option") -> None:
    """One :class:`FutureWarning` saying that ``old`` is now ``new``."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename in _INTERNAL:
        level, frame = level + 1, frame.f_back
    warnings.warn(
        f"{what} {old!r} is deprecated and will be removed; use {new!r} (same meaning)",
        FutureWarning,
        stacklevel=level,
    )


def renamed_value(name: str, value: Any) -> Any:
    """``value`` of field ``name``, an old value translated (with a warning)."""
    new = VALUE_ALIASES.get(name, {}).get(value) if isinstance(value, str) else None
    if new is None:
        return value
    warn_renamed(value, new, f"{name} value")
    return new


def renamed_keys(
    data: Mapping[str, Any], known: Sequence[str] | None = None, what: str = "RoCLIP option"
) -> dict[str, Any]:
    """``data`` (field -> value) with old field names and values translated, each warning once.

    Raises:
        ValueError: an old name given beside its new one (which of them was meant is unclear),
            or, where ``known`` lists the field names, a name that is none of them.
    """
    renamed: dict[str, Any] = {}
    for key, value in data.items():
        new = FIELD_ALIASES.get(key)
        if new is not None:
            if new in data or new in renamed:
                raise ValueError(f"{what} {key!r} given beside its new name {new!r}; drop {key!r}")
            warn_renamed(key, new, what)
            key = new
        renamed[key] = renamed_value(key, value)
    unknown = sorted(set(renamed) - set(known)) if known is not None else []
    if unknown:
        raise ValueError(f"unknown RoCLIP option(s) {unknown}; known: {', '.join(known or [])}")
    return renamed


def renamed_flag_field(name: str, flag: str) -> str:
    """The field of ``flag`` (whose field-like ``name`` may be an old one, with a warning)."""
    new = FIELD_ALIASES.get(name)
    if new is None:
        return name
    warn_renamed(flag, flag.replace(name.replace("_", "-"), new.replace("_", "-")), "flag")
    return new


T = TypeVar("T", bound=type)


def takes_old_names(cls: T) -> T:
    """Let ``cls`` (the config dataclass) take old keywords and answer old attribute names.

    Its generated ``__init__`` is wrapped (``dataclasses.replace`` goes through it too), and
    each old field name becomes a read-only property that warns and returns the new field.
    """
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **renamed_keys(kwargs))

    cls.__init__ = __init__  # type: ignore[misc]
    for old, new in FIELD_ALIASES.items():
        setattr(cls, old, renamed_attribute(old, new))
    return cls


def renamed_attribute(old: str, new: str) -> property:
    """A read-only property ``old`` that warns and returns attribute ``new``.

    For the classes whose attribute was renamed (``RunResult.matching_epochs`` and the like):
    code reading the old name keeps working, and is told the new one.
    """

    def read(self: Any) -> Any:
        warn_renamed(f"{type(self).__name__}.{old}", f"{type(self).__name__}.{new}", "attribute")
        return getattr(self, new)

    return property(read, doc=f"Deprecated: ``{new}``.")


def saved_defended_epochs(record: Mapping[str, Any], default: Any = None) -> Any:
    """A saved run's ``defended_epochs``, or its old key ``matching_epochs``.

    Files written before the rename still read; no warning, since a file is data, not code a
    user can change.
    """
    return record.get("defended_epochs", record.get("matching_epochs", default))


class _DeprecatedFlag(argparse.Action):
    """An old ``--roclip-*`` flag: stores into the new field's ``dest``, with a warning."""

    def __init__(self, *args: Any, new_flag: str = "", **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(*args, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        warn_renamed(str(option_string), self.new_flag, "flag")
        setattr(namespace, self.dest, values)


def add_old_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    types: Mapping[str, Callable[[str], Any]],
) -> None:
    """Add each old flag, hidden from the help, as an alias of its new flag.

    Hidden because the help should teach the new names; docs/config.md lists the old ones.

    Args:
        parser: where the new flags were added (``config.add_argparse_args``).
        types: field name -> the new flag's argparse ``type``.
    """
    for old, new in FIELD_ALIASES.items():
        parser.add_argument(
            _flag(old),
            dest="roclip_" + new,
            type=value_type(new, types[new]),
            default=argparse.SUPPRESS,
            action=_DeprecatedFlag,
            new_flag=_flag(new),
            help=argparse.SUPPRESS,
        )


def _flag(name: str) -> str:
    """``config.flag_name`` (not imported: config imports this module)."""
    return "--roclip-" + name.replace("_", "-")


def value_type(name: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` for field ``name`` that translates its old values first.

    argparse checks ``choices`` after ``type``, so an old value reaches the check renamed.
    """
    if name not in VALUE_ALIASES:
        return convert

    def parse(text: str) -> Any:
        return renamed_value(name, convert(text))

    return parse
