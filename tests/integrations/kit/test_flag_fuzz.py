"""Fuzz of every flag of the kit's ``roclip`` commands (``demo``, ``data``, ``poison``,
``eval``, ``scan``), read from their parsers, so a flag added to one is fuzzed without a new
strategy.

Each example gives one flag a value drawn from its parser entry (roclip_plugin.testing:
``bad_flag_values``), a bad ``--roclip-*`` value, or a bad file: missing, a classes JSON
without its "classes" key, a CSV whose columns are not the ones the flags name. Contract:
exit 0 or 2, never a traceback; an exit 2 prints one error line naming the flag, and values of
the wrong kind, empty values and bad files must be refused without changing a file. The work
of each command is replaced by a stub that stops it (exit 0), so no example builds data,
poisons or trains. CI draws a few examples per flag; ``pytest -m slow`` on this file many.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("open_clip")
pytest.importorskip("sklearn")

import roclip_kit.attack.poison  # noqa: E402
import roclip_kit.commands.scan  # noqa: E402
import roclip_kit.data.datasets  # noqa: E402
import roclip_kit.demo.run  # noqa: E402
import roclip_kit.evaluate.run  # noqa: E402
import roclip_kit.plugin  # noqa: E402

from roclip_plugin import get_plugin_manager  # noqa: E402
from roclip_plugin.cli import build_parser  # noqa: E402
from roclip_plugin.testing import (  # noqa: E402
    CommandResult,
    assert_clean_exit,
    assert_refused,
    bad_flag_values,
    bad_roclip_values,
    empty_spellings,
    fuzz_settings,
    snapshot,
    subcommand,
    value_flags,
)

from . import test_bad_input  # noqa: E402
from .tiny import run_roclip  # noqa: E402

world = test_bad_input.world  # its module fixture: a dataset, its poisoned copy, a checkpoint

FAST, SLOW = 2, 100
STUBS = {  # the first step of each command's work, after every check
    "data": (roclip_kit.data.datasets, "load_source"),
    "poison": (roclip_kit.attack.poison, "replacing"),
    "eval": (roclip_kit.evaluate.run, "load_openclip"),
    "demo": (roclip_kit.demo.run, "build_data"),
    "scan": (roclip_kit.commands.scan, "load_openclip"),
}
INPUT_FILES = {  # flags naming a file or folder the command reads: missing ones are bad
    "poison": ("--dataset", "--csv", "--classes", "--test-csv"),
    "eval": ("--checkpoint", "--dataset", "--test-csv", "--train-csv", "--classes",
             "--manifest", "--suspicious", "--run-dir"),
    "scan": ("--checkpoint", "--dataset", "--csv", "--manifest"),
}  # fmt: skip
CSV_FLAGS = {"--csv", "--test-csv", "--train-csv"}


class Started(Exception):
    """Raised by a stubbed-out step: the command accepted every value and began its work."""


def _start(*args, **kwargs):
    raise Started


def _parser_flags(command: str) -> dict:
    pm = get_plugin_manager(autoload=False)
    pm.register(roclip_kit.plugin)
    return value_flags(subcommand(build_parser(pm), command))


FLAGS = {command: _parser_flags(command) for command in STUBS}


def _base(world: dict[str, Path], command: str) -> list[str]:
    """A command line that passes every check, so the fuzzed flag is the one at fault."""
    if command == "data":
        return ["data", "--dataset", "digits", "--out", str(world["data"]), "--train-limit", "50"]
    if command == "poison":
        return ["poison", "--dataset", str(world["data"]), "--out", str(world["poisoned"]),
                "--backdoor-count", "2", "--backdoor-class", "one"]  # fmt: skip
    if command == "eval":
        return ["eval", "--checkpoint", str(world["checkpoint"]), "--model",
                f"local-dir:{world['model']}", "--dataset", str(world["poisoned"]), "--json",
                str(world["json"])]  # fmt: skip
    if command == "scan":
        return ["scan", "--checkpoint", str(world["checkpoint"]), "--model",
                f"local-dir:{world['model']}", "--dataset", str(world["poisoned"]), "--out",
                str(world["root"] / "scan")]  # fmt: skip
    return ["demo", "--dataset", "digits", "--out", str(world["demo"])]


@pytest.fixture(scope="module")
def bad_files(world: dict[str, Path]) -> dict[str, Path]:
    """Files of the right kind with the wrong content."""
    root = world["root"] / "bad-files"
    root.mkdir(exist_ok=True)
    (root / "no-key.json").write_text('{"names": ["zero", "one"]}')
    (root / "not-a-list.json").write_text('{"classes": "zero one"}')
    (root / "columns.csv").write_text("image\tcaption\tclass\na.png\ta digit\tzero\n")
    (root / "comma.csv").write_text("filepath,title,label\na.png,a digit,zero\n")
    return {"missing": world["root"] / "no" / "such", **{p.stem: p for p in root.iterdir()}}


def _bad_file(command: str, flag: str, bad_files: dict[str, Path]) -> st.SearchStrategy[str]:
    if flag not in INPUT_FILES.get(command, ()):
        return st.nothing()
    names = ["missing"]
    if flag == "--classes":
        names += ["no-key", "not-a-list"]
    if flag in CSV_FLAGS:
        names += ["columns", "comma"]
    return st.sampled_from([str(bad_files[name]) for name in names])


def _draw(command: str, flag: str, data: st.DataObject, bad_files: dict[str, Path]):
    refused = _bad_file(command, flag, bad_files)
    roclip = bad_roclip_values()
    if flag in roclip:
        refused = refused | roclip[flag]
    drawn = bad_flag_values(FLAGS[command][flag], flag) | refused.map(
        lambda value: ([f"{flag}={value}"], True)
    )
    return data.draw(drawn, label=flag)


def _run(argv: list[str]) -> CommandResult:
    try:
        return run_roclip(argv)
    except Started:
        return CommandResult(0, "")


def _fuzz(command: str, flag: str, data, world, bad_files) -> None:
    words, refused = _draw(command, flag, data, bad_files)
    argv = [*_base(world, command), *words]
    if flag == "--csv" and command == "poison":  # --csv replaces --dataset: not both
        argv = [*argv[:1], *argv[3:], "--classes", str(world["data"] / "classes.json")]
    if flag == "--csv" and command == "scan":
        argv = [word for word in argv if word not in ("--dataset", str(world["poisoned"]))]
    before = snapshot(world["root"])
    result = _run(argv)
    if refused:
        assert_refused(result, flag)
        assert snapshot(world["root"]) == before, f"{flag}: a refused value changed a file"
    else:
        assert_clean_exit(result, flag)


CASES = [(command, flag) for command, flags in FLAGS.items() for flag in sorted(flags)]


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An odd value the command accepts (``--out 9821991802529118``) is a relative folder that
    # the command creates before its stubbed work: made in a scratch folder, not the checkout.
    monkeypatch.chdir(tmp_path)
    for module, name in STUBS.values():
        monkeypatch.setattr(module, name, _start)


@pytest.mark.parametrize(("command", "flag"), CASES)
@fuzz_settings(FAST)
@given(data=st.data())
def test_every_kit_flag_fuzzed(command, flag, data, world, bad_files, stubbed) -> None:
    _fuzz(command, flag, data, world, bad_files)


@pytest.mark.slow
@pytest.mark.parametrize(("command", "flag"), CASES)
@fuzz_settings(SLOW)
@given(data=st.data())
def test_every_kit_flag_fuzzed_long(command, flag, data, world, bad_files, stubbed) -> None:
    _fuzz(command, flag, data, world, bad_files)


@pytest.mark.parametrize(
    ("command", "flag", "words"),
    [(c, f, w) for c, f in CASES if FLAGS[c][f].nargs != "*" for w in empty_spellings(f)],
)
def test_an_empty_value_is_refused_by_name(command, flag, words, world, stubbed) -> None:
    before = snapshot(world["root"])
    assert_refused(_run([*_base(world, command), *words]), flag)
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("name", ["no-key", "not-a-list"])
@pytest.mark.parametrize("command", ["poison", "eval"])
def test_a_classes_file_without_its_classes_is_refused(command, name, world, bad_files, stubbed):
    result = _run([*_base(world, command), "--classes", str(bad_files[name])])
    assert_refused(result, "--classes")
    assert '"classes"' in result.output


@pytest.mark.parametrize("name", ["columns", "comma"])
def test_a_csv_with_other_columns_names_the_column_flag(name, world, bad_files, stubbed) -> None:
    argv = ["poison", "--csv", str(bad_files[name]), "--classes",
            str(world["data"] / "classes.json"), "--out", str(world["poisoned"]),
            "--backdoor-count", "1", "--backdoor-class", "one"]  # fmt: skip
    result = _run(argv)
    assert_refused(result, "--img-key")
    if name == "comma":  # one column: the hint is the separator
        assert "--separator" in result.output


def test_every_command_is_fuzzed() -> None:
    """The kit's commands are all here: one added to the plugin must get a stub."""
    assert set(STUBS) == set(roclip_kit.plugin.COMMANDS)


@pytest.mark.parametrize("command", list(STUBS))
def test_the_stub_stops_an_accepted_command(command, world, stubbed) -> None:
    """The base command lines pass every check: the fuzzed flag is the only bad one."""
    assert _run(_base(world, command)).code == 0
