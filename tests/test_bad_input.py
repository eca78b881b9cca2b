"""Hostile input, generated: every flag of ``roclip smoke`` and ``roclip flags``, every
``RoClipConfig`` field and every ``defense.loss`` argument refuse bad values clearly.

Commands: exit code 2, one error line naming the flag, no traceback, no file changed. Python:
a ``ValueError`` or ``TypeError`` naming the argument. Examples are derandomized, so CI sees
the same ones every run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import roclip_plugin.smoke
from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager
from roclip_plugin.cli import main
from roclip_plugin.config import field_names
from roclip_plugin.loss import DistInfo
from roclip_plugin.testing import (
    assert_refused,
    bad_input_settings,
    bad_ints,
    bad_roclip_values,
    not_in,
    run_command,
    snapshot,
)

SETTINGS = bad_input_settings(8)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "results.json").write_text('{"earlier": "run"}')
    (root / "a-file").write_text("not a folder")
    return {"root": root, "json": root / "results.json", "file": root / "a-file"}


def _no_training(*args, **kwargs):
    raise AssertionError("roclip smoke started training with a bad value")


def _smoke_flags(outputs: dict[str, Path]) -> dict[str, st.SearchStrategy[str]]:
    root, a_file = outputs["root"], outputs["file"]
    paths = st.sampled_from(["", str(root), str(a_file / "r.json")])
    return {
        "--device": st.sampled_from(["bogus", "", "cuda:x", "gpu", "cuda:99", "meta", "cpu:0:1"]),
        "--seed": bad_ints(0),
        "--epochs": bad_ints(1, 10_000),
        "--train": bad_ints(1, 1_000_000),
        "--json": paths,
        **bad_roclip_values(),
    }


SMOKE_FLAGS = ["--device", "--seed", "--epochs", "--train", "--json", *bad_roclip_values()]


@pytest.mark.parametrize("flag", SMOKE_FLAGS)
@SETTINGS
@given(data=st.data())
def test_smoke_refuses_every_bad_value(flag, data, outputs, monkeypatch) -> None:
    monkeypatch.setattr(roclip_plugin.smoke, "run_demo", _no_training)
    value = data.draw(_smoke_flags(outputs)[flag], label=flag)
    before = snapshot(outputs["root"])
    argv = ["smoke", "--json", str(outputs["json"]), f"{flag}={value}"]
    assert_refused(run_command(lambda a: main(a, pm=get_plugin_manager()), argv), flag)
    assert snapshot(outputs["root"]) == before


@SETTINGS
@given(value=not_in(("default", "reference")))
def test_flags_refuses_an_unknown_preset(value) -> None:
    assert_refused(run_command(main, ["flags", f"--preset={value}"]), "--preset")


# -- RoClipConfig from Python ----------------------------------------------------------------

WRONG_TYPES = st.sampled_from(["3", b"3", [3], {"n": 3}, True, 1j, object()])
INT_RANGES = {  # low, high of the integer fields (high None: 2**31 - 1 or 2**63 - 1)
    "pool_size": 1,
    "defend_every": 1,
    "first_defended_epoch": 0,
    "ramp_final_every": 1,
    "period_steps": 0,
    "match_chunk_size": 0,
    "ivf_nlist": 1,
    "ivf_nprobe": 1,
    "seed": 0,
    "history_slots": 0,
    "density_k": 1,
    "image_bank_size": 1,
    "gmm_window": 4,
    "unimodal_warmup_epochs": 0,
    "image_aug_stop_epoch": 0,
}
REAL_RANGES = {  # (low, high) of the number fields, both ends included here for simplicity
    "warmup_fraction": (0.0, 1.0),
    "image_aug_stop_fraction": (0.0, 1.0),
    "adaptive_threshold": (0.0, 1.0),
    "match_fraction": (0.0, 1.0),
    "suspicious_margin": (0.0, 2.0),
    "eda_alpha": (0.0, 1.0),
    "eda_p": (0.0, 1.0),
    "risk_weight": (0.0, 1.0),
    "history_decay": (0.0, 1.0),
    "gmm_threshold": (0.0, 1.0),
    "safe_share_start": (0.0, 1.0),
    "safe_share_growth": (0.0, 1.0),
}
OPTIONAL = (
    "first_defended_epoch",
    "warmup_fraction",
    "image_aug_stop_epoch",
    "image_aug_stop_fraction",
)


def _bad_field_values(name: str) -> st.SearchStrategy[object]:
    """Python values field ``name`` refuses: wrong types, out of range, not finite."""
    none = st.nothing() if name in OPTIONAL else st.none()
    if name in INT_RANGES:
        high = RoClipConfig().defend_every if name == "ramp_final_every" else 2**63 - 1
        return (
            WRONG_TYPES
            | none
            | st.floats(allow_nan=True)
            | st.integers(max_value=INT_RANGES[name] - 1)
            | st.integers(min_value=high + 1, max_value=high + 2**70)
        )
    if name in REAL_RANGES:
        low, high = REAL_RANGES[name]
        return (
            WRONG_TYPES
            | none
            | st.sampled_from([math.nan, math.inf, -math.inf])
            | st.floats(max_value=low, exclude_max=True, allow_nan=False).filter(lambda v: v < low)
            | st.floats(min_value=high, exclude_min=True, allow_nan=False)
        )
    # choices and registered names; 'bogus' as a name is refused when the policy (or the
    # risk engine) is built
    names = ("image_aug", "text_aug", "risk_score")
    return st.sampled_from(["", " ", None, 3, b"x", ["roclip"], True]) | (
        st.nothing() if name in names else st.sampled_from(["bogus", "EPOCH", "fp16"])
    )


def test_every_field_has_bad_values() -> None:
    assert set(field_names()) == set(INT_RANGES) | set(REAL_RANGES) | {
        f for f in field_names() if isinstance(getattr(RoClipConfig(), f), str)
    }


@pytest.mark.parametrize("name", field_names())
@SETTINGS
@given(data=st.data())
def test_config_fields_refuse_bad_python_values(name, data) -> None:
    value = data.draw(_bad_field_values(name), label=name)
    with pytest.raises((ValueError, TypeError)) as err:
        RoClipConfig(**{name: value})
    assert name in str(err.value), f"{name}={value!r}: the error does not name it: {err.value}"


# -- defense.loss from Python ----------------------------------------------------------------


def _defense(matching: bool) -> RoClipDefense:
    config = RoClipConfig(pool_size=32, first_defended_epoch=0, defend_every=1)
    defense = RoClipDefense(config, plugin_manager=get_plugin_manager(), dist_info=DistInfo())
    if matching:
        defense.start_epoch(0)
        defense.pool.enqueue(F.normalize(torch.randn(16, 8), dim=-1))
    return defense


@st.composite
def bad_loss_calls(draw: st.DrawFn) -> tuple[str, object, object, object]:
    """(the argument at fault, image features, text features, logit scale)."""
    batch = draw(st.integers(1, 9))
    image = F.normalize(torch.randn(batch, 8), dim=-1)
    text = F.normalize(torch.randn(batch, 8), dim=-1)
    scale: object = torch.tensor(14.3)
    fault = draw(
        st.sampled_from(
            [
                "rows",
                "dim",
                "nan",
                "nan-text",
                "scale-x",
                "unnormalised",
                "scale",
                "type",
                "shape",
                "dtype",
            ]  # fmt: skip
        )
    )
    if fault == "rows":
        text = F.normalize(torch.randn(batch + draw(st.integers(1, 5)), 8), dim=-1)
        return "text_features", image, text, scale
    if fault == "dim":
        text = F.normalize(torch.randn(batch, draw(st.integers(9, 20))), dim=-1)
        return "text_features", image, text, scale
    if fault == "nan":
        image[draw(st.integers(0, batch - 1)), draw(st.integers(0, 7))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
        return "image_features", image, text, scale
    if fault == "nan-text":
        text[draw(st.integers(0, batch - 1)), draw(st.integers(0, 7))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
        return "text_features", image, text, scale
    if fault == "unnormalised":
        factor = draw(st.floats(1.1, 1e6) | st.floats(0.0, 0.9))
        image = image * factor
        return "image_features", image, text, scale
    if fault in ("scale", "scale-x"):
        value = draw(st.floats(max_value=0.0) | st.sampled_from([math.nan, math.inf]))
        bad = {
            "scale": torch.tensor(value),
            "scale-x": draw(
                st.sampled_from([torch.ones(2), torch.nn.Parameter(torch.tensor(2.6)), "14"])
            ),
        }[fault]
        return "logit_scale", image, text, bad
    if fault == "type":
        return "image_features", image.tolist(), text, scale
    if fault == "shape":
        return "image_features", image.reshape(batch, 2, 4), text, scale
    return "text_features", image, text.to(torch.int32), scale


@pytest.mark.parametrize("matching", [False, True])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(call=bad_loss_calls())
def test_loss_refuses_bad_arguments_naming_them(matching, call) -> None:
    argument, image, text, scale = call
    defense = _defense(matching)
    with pytest.raises((ValueError, TypeError)) as err:
        defense.loss(image, text, scale)
    assert argument in str(err.value), f"{argument}: {err.value}"
