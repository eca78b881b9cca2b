"""Contract checks for plugin authors, and the strategies they draw from (needs ``hypothesis``).

A matcher plugin is correct when it agrees with brute force. Float32 rounding makes "agrees"
fuzzy on arbitrary data, so the contract uses *exact* data: pool rows whose entries are
``±1/sqrt(m)`` for ``m`` in {1, 4, 16} (unit norm exactly) and images with small integer
entries. Every product and sum is then exact in float32 (and bfloat16 inputs), so ties are
real ties and any correct exhaustive matcher must give bit-identical answers::

    from roclip_plugin.testing import check_matcher
    check_matcher(MyMatcher())          # raises AssertionError naming the broken property

The same holds for a command a plugin adds: :func:`run_command` runs it, :func:`assert_refused`
and :func:`assert_clean_exit` check how it refuses. The hypothesis strategies (exact data,
bad values, the flag fuzz) live in :mod:`roclip_plugin.strategies` and are importable here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - exercised only without the test extra
    raise ImportError(
        "roclip_plugin.testing needs hypothesis: pip install 'roclip-plugin[test]'"
    ) from err

from roclip_plugin.matching import Matcher, brute_force_nearest
from roclip_plugin.pool import CaptionPool
from roclip_plugin.strategies import (  # the strategies, importable from here as before
    EMPTY_SPELLINGS,
    NON_FINITE,
    NON_INTEGERS,
    NON_NUMBERS,
    PoolCase,
    bad_flag_values,
    bad_input_settings,
    bad_ints,
    bad_reals,
    bad_roclip_values,
    empty_spellings,
    empty_values,
    enqueue_sizes,
    exact_embeddings,
    exact_unit_vectors,
    fuzz_settings,
    grid_images,
    not_in,
    odd_values,
    pools,
    random_embeddings,
    value_flags,
    wrong_kind_values,
)

# -- the matcher contract ------------------------------------------------------------------------


def _scores(images: torch.Tensor, pool_rows: torch.Tensor) -> torch.Tensor:
    return images.double() @ pool_rows.double().T


def assert_exact(matcher: Matcher, images: torch.Tensor, pool: CaptionPool) -> None:
    """The matcher equals brute force (first index of the float32 maximum)."""
    got = matcher(images, pool).cpu()
    want = brute_force_nearest(images, pool.features()).cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero().flatten().tolist()
        raise AssertionError(
            f"matcher disagrees with brute force on rows {bad[:5]}: got {got[bad[:5]].tolist()}, "
            f"want {want[bad[:5]].tolist()} (pool of {len(pool)} rows)"
        )


def assert_tie_rule(matcher: Matcher, images: torch.Tensor, pool: CaptionPool) -> None:
    """Among equally similar pool rows the lowest (oldest) index wins."""
    got = matcher(images, pool).cpu()
    scores = _scores(images, pool.features())
    best = scores.max(dim=1, keepdim=True).values
    cols = torch.arange(scores.shape[1]).expand_as(scores)
    lowest = torch.where(scores == best, cols, scores.shape[1]).min(dim=1).values
    if not torch.equal(got, lowest):
        raise AssertionError(
            f"tie rule broken: got {got.tolist()}, lowest tied indices {lowest.tolist()}"
        )


def assert_scale_invariant(
    matcher: Matcher, images: torch.Tensor, pool: CaptionPool, scales: Sequence[float]
) -> None:
    """Scaling image rows by positive factors (powers of two: exact) keeps every match."""
    base = matcher(images, pool).cpu()
    for scale in scales:
        got = matcher(images * scale, pool).cpu()
        if not torch.equal(got, base):
            raise AssertionError(f"scaling images by {scale} changed matches: {base} -> {got}")


def assert_permutation_equivariant(
    matcher: Matcher, images: torch.Tensor, pool: CaptionPool, perm: torch.Tensor
) -> None:
    """Permuting the pool permutes the answer: the match is still a most similar row."""
    rows = pool.features()
    permuted = CaptionPool(len(rows))
    permuted.enqueue(rows[perm])
    got = perm[matcher(images, permuted).cpu()]
    scores = _scores(images, rows)
    chosen = scores.gather(1, got.unsqueeze(1)).squeeze(1)
    if not torch.equal(chosen, scores.max(dim=1).values):
        raise AssertionError(
            f"after permuting the pool the matcher picked rows {got.tolist()} that are not most "
            "similar"
        )


def check_matcher(matcher: Matcher, *, max_examples: int = 60, dim: int = 8) -> None:
    """Run the whole contract on hypothesis-generated exact data; raises on the first breach.

    Args:
        matcher: the matcher under test (called with many different pools).
        max_examples: generated examples.
        dim: embedding width of the generated data (at least 1).
    """

    @settings(
        max_examples=max_examples,
        derandomize=True,  # the same examples on every run: a contract check must not flake
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        case=pools(dim=dim),
        images=st.integers(1, 12).flatmap(lambda b: grid_images(b, dim)),
        k=st.integers(-3, 3),
        data=st.data(),
    )
    def run(case: PoolCase, images: torch.Tensor, k: int, data: st.DataObject) -> None:
        assert_exact(matcher, images, case.pool)
        assert_tie_rule(matcher, images, case.pool)
        assert_scale_invariant(matcher, images, case.pool, [2.0**k, 0.5])
        perm = torch.tensor(data.draw(st.permutations(range(len(case.pool)))), dtype=torch.long)
        assert_permutation_equivariant(matcher, images, case.pool, perm)

    run()


# -- commands refuse bad input ------------------------------------------------------------------
#
# A command that refuses bad input exits 2 with one line naming the flag (never a
# traceback), and touches no file. These helpers run a command in-process, check that contract
# and draw bad values for flags, so a plugin adding a ``roclip`` command can test it the way the
# built-in commands are tested (tests/test_bad_input.py).


@dataclass(frozen=True)
class CommandResult:
    """Exit code and everything a command printed (stdout then stderr)."""

    code: int
    output: str


def run_command(main: Any, argv: Sequence[str]) -> CommandResult:
    """Call ``main(argv)`` in-process with stdout and stderr captured.

    argparse's ``SystemExit`` becomes the exit code; any other exception propagates, so a
    traceback fails the calling test with the traceback shown.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return CommandResult(int(code), out.getvalue() + err.getvalue())


def assert_refused(result: CommandResult, flag: str) -> None:
    """Exit code 2, no traceback, and exactly one ``error:`` line, which names ``flag``."""
    shown = result.output[-2000:]
    assert "Traceback" not in result.output, f"a traceback for {flag}:\n{shown}"
    assert result.code == 2, f"exit code {result.code} for {flag}, expected 2:\n{shown}"
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1, f"{len(errors)} error lines for {flag}, expected one:\n{shown}"
    assert flag in errors[0], f"the error line does not name {flag}: {errors[0]}"


def snapshot(*paths: Path) -> dict[str, tuple[int, str]]:
    """Size and SHA-256 of every file under ``paths`` (to compare before and after a command)."""
    files: dict[str, tuple[int, str]] = {}
    for root in paths:
        found = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for path in found:
            if path.is_file():
                data = path.read_bytes()
                files[str(path)] = (len(data), hashlib.sha256(data).hexdigest())
    return files


def shown_defaults(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's default as its ``--help`` shows it: ``{"--epochs": "10", ...}``.

    Read from the text argparse prints (``%(default)s`` expanded), the ``(default: X)`` at the
    end of an option's help, so a test can compare what the help says with what runs.
    """
    formatter = parser._get_formatter()
    shown = {}
    for action in parser._actions:
        if not action.option_strings or not action.help or action.help == argparse.SUPPRESS:
            continue
        text = " ".join(formatter._expand_help(action).split())
        found = re.findall(r"\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)", text)
        if found:
            shown[action.option_strings[-1]] = found[-1]
    return shown


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``name`` (``roclip smoke`` -> its parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def as_shown(value: Any) -> str:
    """How a help text writes a default value (``None`` as none, a tab as tab, lists 10,50)."""
    if value is None:
        return "none"
    if value == "\t":
        return "tab"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def assert_help_shows_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option with a concrete default says exactly that default in its help.

    Options without one (``None``, or ``--roclip-*`` flags whose default a command decides)
    may describe theirs in words; their tests compare those with what runs.
    """
    shown = shown_defaults(parser)
    for action in parser._actions:
        flag = action.option_strings[-1] if action.option_strings else None
        if flag not in shown or action.default in (None, argparse.SUPPRESS):
            continue
        assert shown[flag] == as_shown(action.default), f"{flag}: help says {shown[flag]!r}"


def assert_clean_exit(result: CommandResult, flag: str) -> None:
    """Exit 0 or 2 and no traceback; an exit 2 has exactly one ``error:`` line naming ``flag``.

    The contract of a fuzzed flag whose value may be valid: a command either runs (here: it
    reaches the stubbed-out work and reports 0) or refuses clearly.
    """
    shown = result.output[-2000:]
    assert "Traceback" not in result.output, f"a traceback for {flag}:\n{shown}"
    assert result.code in (0, 2), f"exit code {result.code} for {flag}, expected 0 or 2:\n{shown}"
    if result.code == 2:
        assert_refused(result, flag)


__all__ = [
    "CommandResult",
    "EMPTY_SPELLINGS",
    "NON_FINITE",
    "NON_INTEGERS",
    "NON_NUMBERS",
    "PoolCase",
    "as_shown",
    "assert_clean_exit",
    "assert_exact",
    "assert_help_shows_defaults",
    "assert_permutation_equivariant",
    "assert_refused",
    "assert_scale_invariant",
    "assert_tie_rule",
    "bad_flag_values",
    "bad_input_settings",
    "bad_ints",
    "bad_reals",
    "bad_roclip_values",
    "check_matcher",
    "empty_spellings",
    "empty_values",
    "enqueue_sizes",
    "exact_embeddings",
    "exact_unit_vectors",
    "fuzz_settings",
    "grid_images",
    "not_in",
    "odd_values",
    "pools",
    "random_embeddings",
    "run_command",
    "shown_defaults",
    "snapshot",
    "subcommand",
    "value_flags",
    "wrong_kind_values",
]
