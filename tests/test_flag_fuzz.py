"""Fuzz of every flag of the core's ``roclip`` commands (``smoke``, ``flags``), read from the
parser so a new flag is fuzzed without a new strategy.

Each example gives one flag a value drawn from its parser entry (roclip_plugin.testing:
``bad_flag_values``), or a bad ``--roclip-*`` value from ``bad_roclip_values``. Contract: exit 0
or 2, never a traceback, and an exit 2 prints one error line naming the flag; values of the
wrong kind and empty values must be refused. The smoke's training is replaced by a stub, so
an accepted value stops there (exit 0) and no example trains. CI draws a few examples per
flag; ``pytest -m slow tests/test_flag_fuzz.py`` draws many.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import roclip_plugin.smoke
from roclip_plugin import get_plugin_manager
from roclip_plugin.cli import build_parser, main
from roclip_plugin.testing import (
    CommandResult,
    assert_clean_exit,
    assert_refused,
    bad_flag_values,
    bad_roclip_values,
    empty_spellings,
    fuzz_settings,
    run_command,
    snapshot,
    subcommand,
    value_flags,
)

FAST, SLOW = 3, 150


class Started(Exception):
    """Raised by the stubbed-out work: the command accepted every value."""


def _start(*args, **kwargs):
    raise Started


def _flags(command: str) -> dict:
    return value_flags(subcommand(build_parser(get_plugin_manager()), command))


SMOKE = sorted(_flags("smoke"))
FLAGS = sorted(_flags("flags"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flag-fuzz")
    (root / "results.json").write_text('{"earlier": "run"}')
    return {"root": root, "json": root / "results.json"}


def _run(argv: list[str]) -> CommandResult:
    try:
        return run_command(lambda a: main(a, pm=get_plugin_manager()), argv)
    except Started:
        return CommandResult(0, "")


def _draw(command: str, flag: str, data: st.DataObject) -> tuple[list[str], bool]:
    drawn = bad_flag_values(_flags(command)[flag], flag)
    roclip = bad_roclip_values()
    if flag in roclip:  # the ranges of RoClipConfig: refused as surely as a wrong kind
        drawn = drawn | roclip[flag].map(lambda value: ([f"{flag}={value}"], True))
    return data.draw(drawn, label=flag)


def _fuzz_smoke(flag: str, data: st.DataObject, outputs: dict[str, Path]) -> None:
    words, refused = _draw("smoke", flag, data)
    before = snapshot(outputs["root"])
    result = _run(["smoke", "--json", str(outputs["json"]), *words])
    if refused:
        assert_refused(result, flag)
        assert snapshot(outputs["root"]) == before, f"{flag}: a refused value changed a file"
    else:
        assert_clean_exit(result, flag)


@pytest.mark.parametrize("flag", SMOKE)
@fuzz_settings(FAST)
@given(data=st.data())
def test_smoke_flags_fuzzed(flag, data, outputs, monkeypatch) -> None:
    monkeypatch.setattr(roclip_plugin.smoke, "run_demo", _start)
    _fuzz_smoke(flag, data, outputs)


@pytest.mark.slow
@pytest.mark.parametrize("flag", SMOKE)
@fuzz_settings(SLOW)
@given(data=st.data())
def test_smoke_flags_fuzzed_long(flag, data, outputs, monkeypatch) -> None:
    monkeypatch.setattr(roclip_plugin.smoke, "run_demo", _start)
    _fuzz_smoke(flag, data, outputs)


@pytest.mark.parametrize(
    "examples", [pytest.param(FAST), pytest.param(SLOW, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("flag", FLAGS)
def test_flags_command_fuzzed(flag, examples) -> None:
    @fuzz_settings(examples)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        words, refused = _draw("flags", flag, data)
        result = _run(["flags", *words])
        (assert_refused if refused else assert_clean_exit)(result, flag)

    run()


@pytest.mark.parametrize(
    ("command", "flag", "words"),
    [
        (command, flag, words)
        for command, flags in (("smoke", SMOKE), ("flags", FLAGS))
        for flag in flags
        for words in empty_spellings(flag)
    ],
)
def test_an_empty_value_is_refused_by_name(command, flag, words, outputs, monkeypatch) -> None:
    """Every spelling of "no value" for every flag: tried whole, not sampled."""
    monkeypatch.setattr(roclip_plugin.smoke, "run_demo", _start)
    base = ["smoke", "--json", str(outputs["json"])] if command == "smoke" else [command]
    assert_refused(_run([*base, *words]), flag)


def test_every_smoke_flag_is_fuzzed() -> None:
    """The fuzz reads the parser: the flags it covers are the smoke's, --roclip-* included."""
    assert set(bad_roclip_values()) <= set(SMOKE)
    assert {"--device", "--seed", "--epochs", "--train", "--json"} <= set(SMOKE)


def test_the_stub_stops_an_accepted_smoke(outputs, monkeypatch) -> None:
    """Without this, an accepted value would train; with it, a good command reports 0."""
    monkeypatch.setattr(roclip_plugin.smoke, "run_demo", _start)
    assert _run(["smoke", "--json", str(outputs["root"] / "new.json")]).code == 0
