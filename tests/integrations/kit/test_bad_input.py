"""Hostile input, generated, for the kit's commands: ``roclip data``, ``poison``, ``eval``,
``scan`` and ``demo``. Every bad value of every flag exits 2 with one error line naming the
flag, never a traceback, and changes no file of an existing output (an earlier build, an
earlier poisoned set, an earlier results JSON, an earlier demo). The work itself never starts:
the expensive step of each command is replaced by a function that fails the test if it is
reached.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("open_clip")
pytest.importorskip("sklearn")

import roclip_kit.commands.scan  # noqa: E402
import roclip_kit.data.datasets  # noqa: E402
import roclip_kit.demo.run  # noqa: E402
import roclip_kit.evaluate.run  # noqa: E402
from roclip_kit.attack.poison import poison_dataset  # noqa: E402
from roclip_kit.data.datasets import build_captioned_dataset  # noqa: E402

from roclip_plugin.testing import (  # noqa: E402
    assert_refused,
    bad_input_settings,
    bad_ints,
    bad_reals,
    bad_roclip_values,
    not_in,
    snapshot,
)

from .tiny import MODEL_CFG, run_roclip  # noqa: E402

SETTINGS = bad_input_settings(5)
DEVICES = st.sampled_from(["bogus", "", "cuda:x", "gpu", "cuda:99", "meta"])


def _never(*args, **kwargs):
    raise AssertionError("the command started its work with a bad value")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset, its poisoned copy, a tiny model checkpoint, JSON results and odd files."""
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("kit-bad-input")
    data = root / "data"
    build_captioned_dataset("digits", data, train_limit=100, test_limit=30, image_size=16)
    poisoned = root / "poisoned"
    poison_dataset(
        poisoned,
        dataset_dir=data,
        targets=2,
        captions_per_target=3,
        backdoor_count=3,
        backdoor_class="one",
    )
    model = root / "tiny"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    net = open_clip.create_model(f"local-dir:{model}", load_weights=False)
    checkpoint = root / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": net.state_dict()}, checkpoint)
    (root / "results.json").write_text('{"earlier": "evaluation"}')
    (root / "a-file").write_text("not a folder")
    (root / "no-json.json").write_text("{not json")
    (root / "no-manifest.json").write_text('{"format": "something else"}')
    (root / "epoch_1.roclip").write_bytes(b"RoCLIP state")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    demo = root / "demo"
    for name in ("poisoned/manifest.json", "runs/clip/final.pt", "results.json"):
        (demo / name).parent.mkdir(parents=True, exist_ok=True)
        (demo / name).write_text("an earlier demo")
    return {
        "root": root, "data": data, "poisoned": poisoned, "model": model,
        "checkpoint": checkpoint, "json": root / "results.json", "file": root / "a-file",
        "foreign": foreign, "demo": demo,
    }  # fmt: skip


def _check(world: dict[str, Path], argv: list[str], flag: str) -> None:
    before = snapshot(world["root"])
    assert_refused(run_roclip(argv), flag)
    assert snapshot(world["root"]) == before, f"{flag}: a file changed"


def _paths(world: dict[str, Path], *kinds: str) -> st.SearchStrategy[str]:
    """Bad paths: empty, a file where a folder goes, a folder where a file goes, missing..."""
    choices = {
        "empty": "",
        "missing": str(world["root"] / "no" / "such"),
        "dir": str(world["root"]),
        "file": str(world["file"]),
        "under-file": str(world["file"] / "x"),
        "foreign": str(world["foreign"]),
        "not-json": str(world["root"] / "no-json.json"),
        "not-manifest": str(world["root"] / "no-manifest.json"),
        "state": str(world["root"] / "epoch_1.roclip"),
    }
    return st.sampled_from([choices[k] for k in kinds])


# -- roclip data ---------------------------------------------------------------------------


def _data_flags(world: dict[str, Path]) -> dict[str, st.SearchStrategy[str]]:
    return {
        "--dataset": not_in(("mnist", "fashion-mnist", "digits")),
        "--out": _paths(world, "empty", "file", "under-file", "foreign"),
        "--seed": bad_ints(0),
        "--train-limit": bad_ints(1),
        "--test-limit": bad_ints(1),
        "--image-size": bad_ints(8, 1024),
        "--attribute-rate": bad_reals(0.0, 1.0),
    }


@pytest.mark.parametrize(
    "flag", ["--dataset", "--out", "--seed", "--train-limit", "--test-limit", "--image-size",
             "--attribute-rate"],
)  # fmt: skip
@SETTINGS
@given(data=st.data())
def test_data_refuses_every_bad_value(flag, data, world, monkeypatch) -> None:
    monkeypatch.setattr(roclip_kit.data.datasets, "load_source", _never)
    value = data.draw(_data_flags(world)[flag], label=flag)
    argv = ["data", "--dataset", "digits", "--out", str(world["data"]), "--train-limit", "50",
            f"{flag}={value}"]  # fmt: skip
    _check(world, argv, flag)


# -- roclip poison -------------------------------------------------------------------------

POISON_BASE = ["--backdoor-count", "2", "--backdoor-class", "one"]


def _poison_flags(world: dict[str, Path]) -> dict[str, tuple[list[str], st.SearchStrategy[str]]]:
    """flag -> (the other flags it needs, its bad values)."""
    targeted = ["--targets", "1", "--captions-per-target", "2"]
    columns = ("filepath", "title", "label")
    return {
        "--dataset": ([], _paths(world, "empty", "missing", "file")),
        "--csv": (
            [*POISON_BASE, "--classes", str(world["data"] / "classes.json")],
            _paths(world, "empty", "missing", "dir"),
        ),
        "--classes": ([], _paths(world, "empty", "missing", "dir", "not-json")),
        "--test-csv": (targeted, _paths(world, "empty", "missing", "dir")),
        "--out": ([], _paths(world, "empty", "file", "under-file", "foreign")),
        "--seed": ([], bad_ints(0)),
        "--img-key": ([], not_in(columns)),
        "--caption-key": ([], not_in(columns)),
        "--label-key": ([], not_in(columns)),
        "--separator": ([], st.sampled_from(["", "ab", '"', "\n", "--", ";;"])),
        "--targets": (["--captions-per-target", "2"], bad_ints(0, 30)),
        "--captions-per-target": (
            ["--targets", "1"],
            bad_ints(1, 100).filter(lambda t: "," not in t),
        ),
        "--adversarial-class": (
            targeted,
            not_in(
                ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
            ).filter(lambda t: not t.strip().isdigit()),
        ),
        "--target-rows": (
            ["--captions-per-target", "2"],
            st.sampled_from(["", "x", "1,x", "-1", "30", "0,0", "1,,", "99999"]),
        ),
        "--backdoor-count": (["--backdoor-class", "one"], bad_ints(1, 90)),
        "--backdoor-rate": (
            ["--backdoor-class", "one"],
            bad_reals(0.0, 1.0, low_open=True, high_open=True),
        ),
        "--backdoor-class": (
            ["--backdoor-count", "2"],
            not_in(
                ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
            ).filter(lambda t: not t.strip().isdigit()),
        ),
        "--trigger": (POISON_BASE, not_in(("patch", "blend", "wanet"))),
        "--patch-size": (
            POISON_BASE,
            st.sampled_from(["0", "-3", "9", "1000", "0.75", "1.0", "nan", "inf", "-0.5", "x", ""]),
        ),
        "--patch-position": (
            POISON_BASE,
            st.sampled_from(["middle", "", "1,2,3", "1,x", "left", "TOP-LEFT"]),
        ),
        "--blend-alpha": ([*POISON_BASE, "--trigger", "blend"], bad_reals(0.0, 0.5, low_open=True)),
        "--wanet-k": ([*POISON_BASE, "--trigger", "wanet"], bad_ints(2, 64)),
        "--wanet-strength": (
            [*POISON_BASE, "--trigger", "wanet"],
            bad_reals(0.0, 10.0, low_open=True),
        ),
        "--trigger-seed": (POISON_BASE, bad_ints(0)),
    }


POISON_FLAGS = [
    "--dataset", "--csv", "--classes", "--test-csv", "--out", "--seed", "--img-key",
    "--caption-key", "--label-key", "--separator", "--targets", "--captions-per-target",
    "--adversarial-class", "--target-rows", "--backdoor-count", "--backdoor-rate",
    "--backdoor-class", "--trigger", "--patch-size", "--patch-position", "--blend-alpha",
    "--wanet-k", "--wanet-strength", "--trigger-seed",
]  # fmt: skip


@pytest.mark.parametrize("flag", POISON_FLAGS)
@SETTINGS
@given(data=st.data())
def test_poison_refuses_every_bad_value(flag, data, world) -> None:
    needs, values = _poison_flags(world)[flag]
    value = data.draw(values, label=flag)
    source = [] if flag == "--csv" else ["--dataset", str(world["data"])]
    base = needs if needs else POISON_BASE
    argv = ["poison", *source, "--out", str(world["poisoned"]), *base, f"{flag}={value}"]
    _check(world, argv, flag)


# -- roclip eval ---------------------------------------------------------------------------


def _eval_flags(world: dict[str, Path]) -> dict[str, tuple[list[str], st.SearchStrategy[str]]]:
    manifest = ["--manifest", str(world["poisoned"] / "manifest.json")]
    return {
        "--checkpoint": ([], _paths(world, "empty", "missing", "dir", "state")),
        "--model": ([], st.sampled_from(["bogus-model", "hf-hub:x/y", "local-dir:/no/such", ""])),
        "--device": ([], DEVICES),
        "--batch-size": ([], bad_ints(1)),
        "--dataset": ([], _paths(world, "empty", "missing", "file")),
        "--test-csv": ([], _paths(world, "empty", "missing", "dir")),
        "--train-csv": ([], _paths(world, "empty", "missing", "dir")),
        "--classes": ([], _paths(world, "empty", "missing", "dir", "not-json")),
        "--template": ([], st.sampled_from(["a photo", "{} and {}", "", "{0}", "{x}"])),
        "--manifest": ([], _paths(world, "empty", "missing", "dir", "not-json", "not-manifest")),
        "--suspicious": ([], _paths(world, "missing", "dir")),
        "--run-dir": ([], _paths(world, "missing", "file")),
        "--suspicious-epoch": (manifest, st.sampled_from(["x", "-1", "99", "", "1.5", "last"])),
        "--test-limit": ([], bad_ints(1)),
        "--backdoor-limit": ([], bad_ints(1)),
        "--probe-limit": ([], bad_ints(1)),
        "--probe-c": ([], bad_reals(0.0, sys.float_info.max, low_open=True)),
        "--k": ([], bad_ints(1)),
        "--seed": ([], bad_ints(0)),
        "--json": ([], _paths(world, "empty", "dir", "under-file")),
    }


EVAL_FLAGS = [
    "--checkpoint", "--model", "--device", "--batch-size", "--dataset", "--test-csv",
    "--train-csv", "--classes", "--template", "--manifest", "--suspicious", "--run-dir",
    "--suspicious-epoch", "--test-limit", "--backdoor-limit", "--probe-limit", "--probe-c",
    "--k", "--seed", "--json",
]  # fmt: skip


@pytest.mark.parametrize("flag", EVAL_FLAGS)
@SETTINGS
@given(data=st.data())
def test_eval_refuses_every_bad_value(flag, data, world, monkeypatch) -> None:
    monkeypatch.setattr(roclip_kit.evaluate.run, "load_openclip", _never)
    needs, values = _eval_flags(world)[flag]
    value = data.draw(values, label=flag)
    argv = ["eval", "--checkpoint", str(world["checkpoint"]), "--model",
            f"local-dir:{world['model']}", "--dataset", str(world["poisoned"]), "--json",
            str(world["json"]), *needs, f"{flag}={value}"]  # fmt: skip
    _check(world, argv, flag)


# -- roclip scan ---------------------------------------------------------------------------


def _scan_flags(world: dict[str, Path]) -> dict[str, st.SearchStrategy[str]]:
    from roclip_plugin.scan import DETECTORS

    return {
        "--checkpoint": _paths(world, "empty", "missing", "dir", "state"),
        "--model": st.sampled_from(["bogus-model", "hf-hub:x/y", "local-dir:/no/such"]),
        "--device": DEVICES,
        "--batch-size": bad_ints(1),
        "--dataset": _paths(world, "empty", "missing", "file"),
        "--csv": _paths(world, "empty", "missing", "dir"),
        "--manifest": _paths(world, "empty", "missing", "dir", "not-json", "not-manifest"),
        "--out": _paths(world, "empty", "file", "under-file"),
        "--drop-fraction": bad_reals(0.0, 1.0, high_open=True),
        "--drop-count": bad_ints(0, 200),  # above 200: every one of the 106 rows
        "--drop-by": not_in(DETECTORS),
        "--k": bad_ints(1),
        "--reference-size": bad_ints(0),
        "--peer-reference-size": bad_ints(0),
        "--seed": bad_ints(0),
        "--chunk-size": bad_ints(1),
    }


SCAN_FLAGS = [
    "--checkpoint", "--model", "--device", "--batch-size", "--dataset", "--csv", "--manifest",
    "--out", "--drop-fraction", "--drop-count", "--drop-by", "--k", "--reference-size", "--seed",
    "--chunk-size", "--peer-reference-size",
]  # fmt: skip


@pytest.mark.parametrize("flag", SCAN_FLAGS)
@SETTINGS
@given(data=st.data())
def test_scan_refuses_every_bad_value(flag, data, world, monkeypatch) -> None:
    monkeypatch.setattr(roclip_kit.commands.scan, "load_openclip", _never)
    value = data.draw(_scan_flags(world)[flag], label=flag)
    argv = ["scan", "--checkpoint", str(world["checkpoint"]), "--model",
            f"local-dir:{world['model']}", "--dataset", str(world["poisoned"]), "--out",
            str(world["root"] / "scan-out"), f"{flag}={value}"]  # fmt: skip
    _check(world, argv, flag)


# -- roclip demo ---------------------------------------------------------------------------


def _demo_flags(world: dict[str, Path]) -> dict[str, st.SearchStrategy[str]]:
    return {
        "--out": _paths(world, "empty", "file", "under-file", "foreign"),
        "--dataset": not_in(("mnist", "fashion-mnist", "digits")),
        "--scale": not_in(("cpu", "gpu")),
        "--trainer": not_in(("tensor", "openclip")),
        "--jobs": bad_ints(1),
        "--device": DEVICES,
        "--seed": bad_ints(0),
        "--train-limit": bad_ints(1),
        "--test-limit": bad_ints(1),
        "--attribute-rate": bad_reals(0.0, 1.0),
        "--epochs": bad_ints(1),
        "--batch-size": bad_ints(1),
        "--lr": bad_reals(0.0, 10.0, low_open=True),
        "--model": not_in(("tensor-cpu", "tensor-gpu")),
        "--eval-limit": bad_ints(1),
        "--targets": bad_ints(0),
        "--captions-per-target": st.sampled_from(["0", "-1", "", "x", "1,0", ",", "2.5"]),
        "--backdoor-rate": bad_reals(0.0, 1.0, high_open=True),
        "--backdoor-class": not_in(
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        ),
        "--trigger": not_in(("patch", "blend", "wanet")),
        **bad_roclip_values(),
    }


DEMO_FLAGS = [
    "--out", "--dataset", "--scale", "--trainer", "--jobs", "--device", "--seed",
    "--train-limit", "--test-limit", "--attribute-rate", "--epochs", "--batch-size", "--lr",
    "--model", "--eval-limit", "--targets", "--captions-per-target", "--backdoor-rate",
    "--backdoor-class", "--trigger", *bad_roclip_values(),
]  # fmt: skip


@pytest.mark.parametrize("flag", DEMO_FLAGS)
@SETTINGS
@given(data=st.data())
def test_demo_refuses_every_bad_value(flag, data, world, monkeypatch) -> None:
    monkeypatch.setattr(roclip_kit.demo.run, "build_data", _never)
    value = data.draw(_demo_flags(world)[flag], label=flag)
    argv = ["demo", "--dataset", "digits", "--out", str(world["demo"]), f"{flag}={value}"]
    _check(world, argv, flag)


OPENCLIP_DEMO_FLAGS = [
    "--jobs", "--train-limit", "--test-limit", "--attribute-rate", "--epochs", "--batch-size",
    "--lr", "--model", "--eval-limit", "--targets", "--captions-per-target", "--backdoor-rate",
]  # fmt: skip


@pytest.mark.parametrize("flag", OPENCLIP_DEMO_FLAGS)
@SETTINGS
@given(data=st.data())
def test_demo_on_the_openclip_trainer_refuses_every_bad_size(flag, data, world, monkeypatch):
    """The sizes of ``--trainer openclip`` are checked as the tensor path's, its presets too."""
    from roclip_kit.train.openclip import PRESETS

    monkeypatch.setattr(roclip_kit.demo.run, "build_data", _never)
    bad = {"--model": not_in(tuple(PRESETS)), "--jobs": bad_ints(1) | st.sampled_from(["2", "8"])}
    value = data.draw(bad[flag] if flag in bad else _demo_flags(world)[flag], label=flag)
    argv = ["demo", "--dataset", "digits", "--trainer", "openclip", "--out", str(world["demo"])]
    _check(world, [*argv, f"{flag}={value}"], flag)
