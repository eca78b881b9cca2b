"""Fuzz of every flag of ``roclip-openclip-train --roclip``: the ``--roclip-*`` flags and
OpenCLIP's own, both read from their parsers, so a flag added by either is fuzzed unasked.

Contract per example: exit 0 or 2, never a traceback, and an exit 2 prints one error line that
names the flag; values of the wrong kind, empty values and the values below that are known to
be bad must be refused. OpenCLIP's training is replaced by a stub, so a value that passes
every check stops there (exit 0): no example trains, none creates the log folder. CI draws a
few examples per flag; ``pytest -m slow tests/integrations/openclip/test_flag_fuzz.py`` many.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("open_clip_train")

import open_clip_train.main  # noqa: E402
import torch  # noqa: E402
from roclip_openclip import main  # noqa: E402
from roclip_openclip.cli import build_parser, openclip_parser  # noqa: E402

from roclip_plugin import get_plugin_manager  # noqa: E402
from roclip_plugin.testing import (  # noqa: E402
    CommandResult,
    assert_clean_exit,
    assert_refused,
    bad_flag_values,
    bad_roclip_values,
    empty_spellings,
    fuzz_settings,
    not_in,
    run_command,
    value_flags,
)

FAST, SLOW = 3, 100
ROCLIP = value_flags(build_parser(get_plugin_manager()))
OPENCLIP = value_flags(openclip_parser())
DEVICES = ("0", "1", "bogus", "cuda:x", "gpu", "cuda:99", "meta", "cpu:0:1", "CUDA")
COLUMNS = ("filepath", "title")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openclip-flag-fuzz")
    (root / "train.csv").write_text("filepath\ttitle\nimg.png\ta digit\n")
    return root


def _argv(run_dir: Path, *extra: str) -> list[str]:
    return [
        "--roclip", "--train-data", str(run_dir / "train.csv"), "--dataset-type", "csv",
        "--precision", "fp32", "--device", "cpu", "--logs", str(run_dir / "logs"),
        "--name", "fuzzed", "--roclip-pool-size", "64", "--batch-size", "1", *extra,
    ]  # fmt: skip


def _known_bad(flag: str) -> st.SearchStrategy[str]:
    """Values known to be bad for flags whose type says nothing (plain strings)."""
    known = {
        "--device": st.sampled_from(DEVICES),
        "--csv-img-key": not_in(COLUMNS).filter(bool),
        "--csv-caption-key": not_in(COLUMNS).filter(bool),
        "--csv-separator": st.sampled_from([",", ";", "|", "ab"]),
        "--aug-cfg": st.sampled_from(["word", "a=b=c", "=1", "scale"]),
        **bad_roclip_values(),
    }
    return known.get(flag, st.nothing())


def _draw(flag: str, data: st.DataObject) -> tuple[list[str], bool]:
    action: argparse.Action = ROCLIP[flag] if flag in ROCLIP else OPENCLIP[flag]
    refused = _known_bad(flag).map(lambda value: ([f"{flag}={value}"], True))
    return data.draw(bad_flag_values(action, flag) | refused, label=flag)


def _run(argv: list[str]) -> CommandResult:
    return run_command(main, argv)


def _fuzz(flag: str, data: st.DataObject, run_dir: Path) -> None:
    words, refused = _draw(flag, data)
    result = _run(_argv(run_dir, *words))
    (assert_refused if refused else assert_clean_exit)(result, flag)
    assert not (run_dir / "logs").exists(), f"{flag}: the log folder was created"


@pytest.fixture(autouse=True)
def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(open_clip_train.main, "main", lambda argv: None)


FLAGS = sorted(set(ROCLIP) | set(OPENCLIP))


@pytest.mark.parametrize("flag", FLAGS)
@fuzz_settings(FAST)
@given(data=st.data())
def test_every_flag_fuzzed(flag, data, run_dir) -> None:
    _fuzz(flag, data, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("flag", FLAGS)
@fuzz_settings(SLOW)
@given(data=st.data())
def test_every_flag_fuzzed_long(flag, data, run_dir) -> None:
    _fuzz(flag, data, run_dir)


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        (flag, words)
        for flag in FLAGS
        if (ROCLIP.get(flag) or OPENCLIP[flag]).nargs != "*"
        for words in empty_spellings(flag)
        if words[-1] == "--" or (ROCLIP.get(flag) or OPENCLIP[flag]).default != ""
    ],
)
def test_an_empty_value_is_refused_by_name(flag, words, run_dir) -> None:
    """Every spelling of "no value" for every flag (``--seed=--`` used to start training).

    An empty string stays allowed where it is the flag's default (``--pretrained ''``).
    """
    assert_refused(_run(_argv(run_dir, *words)), flag)
    assert not (run_dir / "logs").exists()


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"device-{d}")  # not the gpu marker
def test_a_bad_device_is_refused_by_name(device, run_dir) -> None:
    """``--device 0`` ended in torch's RuntimeError traceback."""
    result = _run(_argv(run_dir, "--device", device))
    assert_refused(result, "--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_with_the_fix(run_dir) -> None:
    """OpenCLIP's default device is cuda; without one it fell back to the CPU with a warning."""
    argv = [a for a in _argv(run_dir) if a not in ("--device", "cpu")]
    result = _run(argv)
    assert_refused(result, "--device")
    assert "--device cpu" in result.output


@pytest.mark.parametrize("flag", ["--csv-img-key", "--csv-caption-key"])
def test_a_column_the_csv_lacks_is_refused_naming_the_flag(flag, run_dir) -> None:
    result = _run(_argv(run_dir, flag, "caption"))
    assert_refused(result, flag)
    assert "filepath" in result.output and "title" in result.output  # the columns it has


def test_a_wrong_separator_is_refused_naming_it(run_dir) -> None:
    result = _run(_argv(run_dir, "--csv-separator", ","))
    assert_refused(result, "--csv-separator")


@pytest.mark.parametrize("value", ["word", "a=b=c"])
def test_aug_cfg_refuses_what_is_not_key_value(value, run_dir) -> None:
    """OpenCLIP's own parser raised ValueError (a traceback) on ``--aug-cfg word``."""
    result = _run(_argv(run_dir, "--aug-cfg", value))
    assert_refused(result, "--aug-cfg")
    assert "KEY=VALUE" in result.output


def test_aug_cfg_still_takes_key_values(run_dir) -> None:
    assert _run(_argv(run_dir, "--aug-cfg", "scale=(0.9,1.0)", "color_jitter=0.1")).code == 0


@pytest.mark.parametrize("flag", sorted(f for f, a in OPENCLIP.items() if a.type is float))
def test_openclip_numbers_must_be_finite(flag, run_dir) -> None:
    """OpenCLIP's float flags took nan and trained on it (a NaN weight decay, a NaN loss)."""
    assert_refused(_run(_argv(run_dir, f"{flag}=nan")), flag)


def test_every_flag_of_both_parsers_is_fuzzed() -> None:
    assert {"--device", "--csv-img-key", "--aug-cfg", "--train-data"} <= set(OPENCLIP)
    assert set(bad_roclip_values()) <= set(ROCLIP)


def test_the_stub_stops_an_accepted_run(run_dir) -> None:
    assert _run(_argv(run_dir)).code == 0
    assert not (run_dir / "logs").exists()
