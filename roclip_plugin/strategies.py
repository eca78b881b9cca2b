"""Hypothesis strategies the contract kit (:mod:`roclip_plugin.testing`) draws its data from.

Exact embeddings and caption pools for the matcher contract; bad and odd command-line values
for the refusal tests and the flag fuzz, with the settings those tests run under. The names
are importable from :mod:`roclip_plugin.testing` too, where plugin authors find them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import Field, dataclass, fields
from typing import Any

import torch

try:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - exercised only without the test extra
    raise ImportError(
        "roclip_plugin.testing needs hypothesis: pip install 'roclip-plugin[test]'"
    ) from err

from roclip_plugin.config import RoClipConfig
from roclip_plugin.pool import CaptionPool

# -- strategies -------------------------------------------------------------------------------


@st.composite
def exact_unit_vectors(draw: st.DrawFn, dim: int) -> torch.Tensor:
    """A unit vector with ``m`` entries ``±1/sqrt(m)``, ``m`` in {1, 4, 16}: its norm is 1."""
    m = draw(st.sampled_from([k for k in (1, 4, 16) if k <= dim]))
    positions = draw(st.lists(st.integers(0, dim - 1), min_size=m, max_size=m, unique=True))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=m, max_size=m))
    vec = torch.zeros(dim)
    vec[positions] = torch.tensor(signs) / m**0.5
    return vec


@st.composite
def exact_embeddings(draw: st.DrawFn, rows: int, dim: int) -> torch.Tensor:
    """``[rows, dim]`` of :func:`exact_unit_vectors`, drawn from a small set so rows repeat."""
    alphabet = draw(st.lists(exact_unit_vectors(dim), min_size=1, max_size=max(2, rows // 2)))
    picks = draw(st.lists(st.integers(0, len(alphabet) - 1), min_size=rows, max_size=rows))
    return torch.stack([alphabet[i] for i in picks])


@st.composite
def grid_images(draw: st.DrawFn, rows: int, dim: int) -> torch.Tensor:
    """``[rows, dim]`` with integer entries in [-4, 4], no zero row: exact scores vs exact pools."""
    values = draw(st.lists(st.integers(-4, 4), min_size=rows * dim, max_size=rows * dim))
    images = torch.tensor(values, dtype=torch.float32).reshape(rows, dim)
    zero = images.abs().sum(dim=1) == 0
    images[zero, 0] = 1.0
    return images


@st.composite
def random_embeddings(
    draw: st.DrawFn, rows: int, dim: int, *, normalized: bool = True
) -> torch.Tensor:
    """Gaussian ``[rows, dim]`` from a drawn seed (fast for large shapes), optionally unit rows."""
    seed = draw(st.integers(0, 2**32 - 1))
    out = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(out, dim=-1) if normalized else out


def enqueue_sizes(max_batch: int = 40, max_batches: int = 8) -> st.SearchStrategy[list[int]]:
    """Batch sizes for a sequence of enqueues (may exceed the pool, may be empty)."""
    return st.lists(st.integers(0, max_batch), min_size=1, max_size=max_batches)


@dataclass
class PoolCase:
    """A pool built by a sequence of enqueues, with the rows it was fed in order."""

    pool: CaptionPool
    fed: torch.Tensor


@st.composite
def pools(
    draw: st.DrawFn,
    *,
    dim: int = 8,
    max_size: int = 32,
    exact: bool = True,
) -> PoolCase:
    """A :class:`CaptionPool` after random enqueues (often wrapped around its end)."""
    size = draw(st.integers(1, max_size))
    sizes = draw(enqueue_sizes(max_batch=max(2, size + size // 2)))
    total = max(sum(sizes), 1)
    rows = draw(exact_embeddings(total, dim) if exact else random_embeddings(total, dim))
    pool = CaptionPool(size)
    start = 0
    for n in sizes:
        if n:
            pool.enqueue(rows[start : start + n])
        start += n
    if len(pool) == 0:
        pool.enqueue(rows[:1])
        start = max(start, 1)
    return PoolCase(pool, rows[: max(start, 1)])


NON_INTEGERS = ("", "x", "1.5", "1e3", "nan", "inf", "0x10", "--", "ten")
NON_NUMBERS = ("", "x", "1,5", "one", "--", "0..1", "1e", "nanx")


def bad_ints(low: int, high: int | None = None) -> st.SearchStrategy[str]:
    """Command-line text of values that are not integers in ``[low, high]``."""
    outside = st.integers(max_value=low - 1)
    if high is not None:
        outside = outside | st.integers(min_value=high + 1, max_value=high + 2**40)
    return outside.map(str) | st.sampled_from(NON_INTEGERS)


def bad_reals(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> st.SearchStrategy[str]:
    """Command-line text of values that are not finite numbers in the interval."""
    from roclip_plugin.validation import in_interval

    def inside(value: float) -> bool:
        return in_interval(value, low, high, low_open=low_open, high_open=high_open)

    below = st.floats(max_value=low, allow_nan=False)
    above = st.floats(min_value=high, allow_nan=False)
    outside = (below | above).filter(lambda v: not inside(v))  # -0.0 == 0.0 is inside [0, 1]
    special = st.sampled_from(("nan", "inf", "-inf", *NON_NUMBERS))
    return outside.map(repr) | special


def not_in(choices: Sequence[str]) -> st.SearchStrategy[str]:
    """Text that is none of ``choices`` (argparse choices, registered names)."""
    return st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=12).filter(
        lambda text: text not in choices and not text.startswith("-")
    ) | st.just("")


# Registered names that no registry holds (spellings close to the built-in names)
_BAD_NAMES = {
    "image_aug": ("", " ", "bogus", "roclip ", "Roclip"),
    "text_aug": ("", " ", "bogus", "EDA", "eda "),
    "risk_score": ("", " "),
}


def bad_roclip_values() -> dict[str, st.SearchStrategy[str]]:
    """Bad command-line values of every ``--roclip-*`` flag, by flag.

    Drawn outside what each field of RoClipConfig declares it allows (its choices or range,
    read from the field's metadata). Registered augmentation names and synonym sources that
    exist on another machine (NLTK's WordNet) are not drawn: only values no machine accepts.
    """
    from roclip_plugin import config as c

    values = {"preset": not_in(c.PRESETS)}
    for f in fields(RoClipConfig):
        values[f.name] = _outside(f)
    # with a match_fraction of 1 (the paper's), drop would leave nothing to train on
    if RoClipConfig().match_fraction >= 1:
        values["match_action"] |= st.sampled_from(("drop", "unimodal", "weight"))
    return {c.FLAG_PREFIX + name.replace("_", "-"): strategy for name, strategy in values.items()}


def _outside(f: Field[Any]) -> st.SearchStrategy[str]:
    """Command-line text outside what field ``f`` allows (``none`` too, unless it may be None)."""
    from roclip_plugin.config import Ints, Reals

    allowed, choices = f.metadata["allowed"], f.metadata["choices"]
    if choices:
        return not_in(choices)
    if isinstance(allowed, Ints):
        strategy = bad_ints(*allowed.bounds(RoClipConfig()))
    elif isinstance(allowed, Reals):
        bounds = {"low_open": allowed.low_open, "high_open": allowed.high_open}
        strategy = bad_reals(allowed.low, allowed.high, **bounds)
    else:
        return st.sampled_from(_BAD_NAMES[f.name])
    return strategy.filter(lambda t: t.lower() != "none") if "None" in str(f.type) else strategy


def bad_input_settings(max_examples: int = 5) -> Any:
    """Hypothesis settings for bad-input tests: few examples, no deadline, the same each run.

    Derandomized so CI sees the same examples every time; module fixtures (a built dataset)
    are shared across examples, which is safe since a refused command changes nothing.
    """
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# -- fuzzing every flag of a command ------------------------------------------------------------
#
# The refusal helpers above test the bad values someone thought of for each flag. The fuzz
# below reads a command's parser instead, so a flag added tomorrow is fuzzed without anyone
# writing a strategy for it: values of the wrong kind for its type (text for an integer, a
# word outside its choices), empty values in every spelling a shell produces, and odd values
# (NaN, huge numbers, blanks) that the flag may accept or refuse but must never crash on.

EMPTY_SPELLINGS = ("{flag}=", "{flag}=--", "{flag} --", "{flag} ")
NON_FINITE = ("nan", "inf", "-inf", "NaN", "+inf")


def value_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option of ``parser`` that takes a value, by its first long flag.

    Switches (``--roclip``, ``--no-linear-probe``), ``--help`` and ``--version`` take none, so
    there is no value to get wrong; options with ``nargs`` ``*``/``+`` are kept (an empty or
    malformed list is a bad value too).
    """
    flags = {}
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        flags[(longs or action.option_strings)[0]] = action
    return flags


def _type_name(action: argparse.Action) -> str:
    kind = action.type
    return getattr(kind, "__name__", "") if kind is not None else ""


def empty_spellings(flag: str) -> list[list[str]]:
    """``flag`` given no value, as argv words: ``--f=``, ``--f=--``, ``--f --``, ``--f ''``.

    argparse stores ``--f=--`` as an empty list without calling the flag's type, and ``--f=``
    as an empty string that only some types refuse: both must still be refused by name. A list
    so a test can try every spelling of every flag, not a sample.
    """
    return [form.format(flag=flag).split(" ") for form in EMPTY_SPELLINGS]


def empty_values(flag: str) -> st.SearchStrategy[list[str]]:
    """One of :func:`empty_spellings`, for a fuzz that mixes them with other bad values."""
    return st.sampled_from(empty_spellings(flag))


def wrong_kind_values(action: argparse.Action) -> st.SearchStrategy[str]:
    """Values of the wrong kind for ``action``'s type or choices: no flag may accept one.

    Integers get text that is not an integer, numbers text that is not a number (and NaN and
    infinities: no flag of this project means anything by them), choices a word outside
    them. Other types (paths, names, lists) get a blank; empty values are drawn separately.
    """
    if action.choices is not None:
        return not_in([str(choice) for choice in action.choices]).filter(bool)
    name = _type_name(action)
    if action.type is int:
        return st.sampled_from([t for t in NON_INTEGERS if t not in ("", "--")])
    if action.type is float:
        return st.sampled_from([t for t in (*NON_NUMBERS, *NON_FINITE) if t not in ("", "--")])
    if name == "path_arg":
        return st.sampled_from(["", " ", "\t"])
    return st.nothing()


def odd_values(action: argparse.Action) -> st.SearchStrategy[str]:
    """Values ``action`` may accept or refuse, but must never crash on.

    Huge and negative integers, NaN and extreme floats, blank, control and non-ASCII text:
    the edge of every range and the characters a shell lets through.
    """
    text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8).filter(
        lambda t: not t.startswith("-") and "\x00" not in t
    )
    numbers = (
        st.integers(-(2**70), 2**70).map(str)
        | st.floats(allow_nan=True, allow_infinity=True).map(repr)
        | st.sampled_from(["0", "-0", "1e309", "-1", "9" * 30, "0.0", "1_000"])
    )
    return numbers | text


def bad_flag_values(
    action: argparse.Action, flag: str
) -> st.SearchStrategy[tuple[list[str], bool]]:
    """``(argv words, must be refused)`` for one flag, drawn from its parser entry.

    Wrong kinds and empty values must be refused; odd values may run. A list option
    (``nargs="*"``) may legitimately be given empty, and so may an option whose default is
    empty (OpenCLIP's ``--pretrained ''``), so their empty spellings may run too.
    """
    wrong = wrong_kind_values(action).map(lambda value: ([f"{flag}={value}"], True))
    empty_refused = action.nargs != "*" and action.default != ""
    empty = empty_values(flag).map(lambda words: (words, empty_refused))
    odd = odd_values(action).map(lambda value: ([f"{flag}={value}"], False))
    return st.one_of(wrong, empty, odd)


def fuzz_settings(max_examples: int) -> Any:
    """Hypothesis settings of the flag fuzz: ``bad_input_settings`` with its own budget.

    The CI variant draws a few examples per flag (derandomized, the same every run); the slow
    variant (``pytest -m slow``) draws many, still derandomized so a failure reproduces.
    """
    return bad_input_settings(max_examples)
