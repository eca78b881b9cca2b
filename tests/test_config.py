"""RoClipConfig: validation, presets, the field <-> flag mapping, argparse and round trips."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin.config import (
    AUG_REFRESH,
    DUPLICATE_MATCHES,
    FLAG_PREFIX,
    MATCH_ACTIONS,
    MATCHERS,
    POOL_UPDATES,
    PRECISIONS,
    RISKY_NEGATIVES,
    SCHEDULES,
    SYNONYM_SOURCES,
    RoClipConfig,
    add_argparse_args,
    all_flags,
    config_from_namespace,
    config_to_argv,
    field_from_flag,
    field_names,
    flag_name,
)

INT32_MAX = 2**31 - 1

# (field, bad value, text of the allowed range that the message must show)
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("pool_size", 0, f"[1, {INT32_MAX}]"),
    ("pool_size", -5, f"[1, {INT32_MAX}]"),
    ("pool_size", 2**31, f"[1, {INT32_MAX}]"),
    ("pool_size", 1.5, f"[1, {INT32_MAX}]"),
    ("pool_size", "8", f"[1, {INT32_MAX}]"),
    ("pool_size", None, f"[1, {INT32_MAX}]"),
    ("defend_every", 0, f"[1, {INT32_MAX}]"),
    ("defend_every", -1, f"[1, {INT32_MAX}]"),
    ("first_defended_epoch", -1, f"[0, {INT32_MAX}]"),
    ("first_defended_epoch", 2.0, f"[0, {INT32_MAX}]"),
    ("image_aug_stop_epoch", -1, f"[0, {INT32_MAX}]"),
    ("image_aug_stop_fraction", 0.0, "(0.0, 1.0]"),
    ("image_aug_stop_fraction", 1.5, "(0.0, 1.0]"),
    ("warmup_fraction", -0.1, "[0.0, 1.0)"),
    ("warmup_fraction", 1.0, "[0.0, 1.0)"),
    ("warmup_fraction", 2, "[0.0, 1.0)"),
    ("warmup_fraction", float("nan"), "[0.0, 1.0)"),
    ("warmup_fraction", float("inf"), "[0.0, 1.0)"),
    ("warmup_fraction", "0.5", "[0.0, 1.0)"),
    ("schedule", "cosine", "periodic, ramp, adaptive"),
    ("schedule", "", "periodic, ramp, adaptive"),
    ("ramp_final_every", 0, "[1, 1]"),  # up to defend_every, 1 by default
    ("ramp_final_every", 2, "[1, 1]"),
    ("adaptive_threshold", 0.0, "(0.0, 1.0]"),
    ("adaptive_threshold", 1.5, "(0.0, 1.0]"),
    ("adaptive_threshold", -0.2, "(0.0, 1.0]"),
    ("adaptive_threshold", float("nan"), "(0.0, 1.0]"),
    ("period_steps", -1, f"[0, {INT32_MAX}]"),
    ("pool_update", "never", "every_step, defended_epochs"),
    ("match_fraction", 0.0, "(0.0, 1.0]"),
    ("match_fraction", 1.5, "(0.0, 1.0]"),
    ("match_action", "skip", "match, drop, unimodal, weight"),
    ("risk_split", "otsu", "fixed, gmm"),
    ("risk_score", " ", "a non-empty registered name"),
    ("risk_weight", 1.0, "[0.0, 1.0)"),
    ("history_decay", 0.0, "(0.0, 1.0]"),
    ("history_slots", -1, f"[0, {2**40}]"),
    ("density_k", 0, f"[1, {INT32_MAX}]"),
    ("image_bank_size", 0, f"[1, {INT32_MAX}]"),
    ("gmm_threshold", 0.0, "(0.0, 1.0]"),
    ("gmm_window", 3, f"[4, {INT32_MAX}]"),
    ("safe_share_start", 1.5, "[0.0, 1.0]"),
    ("safe_share_growth", -0.1, "[0.0, 1.0]"),
    ("unimodal_warmup_epochs", -1, f"[0, {INT32_MAX}]"),
    ("duplicate_matches", "merge", "mask, keep"),
    ("risky_negatives", "in", "out, keep"),
    ("precision", "fp16", "fp32, bf16"),
    ("precision", "FP32", "fp32, bf16"),
    ("matcher", "annoy", "torch, faiss, faiss-ivf"),
    ("match_chunk_size", -1, f"[0, {INT32_MAX}]"),
    ("ivf_nlist", 0, f"[1, {INT32_MAX}]"),
    ("ivf_nprobe", 0, f"[1, {INT32_MAX}]"),
    ("seed", -1, f"[0, {2**63 - 1}]"),
    ("seed", 2**63, f"[0, {2**63 - 1}]"),
    ("suspicious_margin", -0.1, "[0.0, 2.0]"),
    ("suspicious_margin", 2.5, "[0.0, 2.0]"),
    ("suspicious_margin", float("nan"), "[0.0, 2.0]"),
    ("image_aug", "", "a non-empty registered name"),
    ("image_aug", 3, "a non-empty registered name"),
    ("text_aug", "  ", "a non-empty registered name"),
    ("image_aug_refresh", "step", "epoch, run"),
    ("text_aug_refresh", "never", "epoch, run"),
    ("eda_alpha", -0.1, "[0.0, 1.0]"),
    ("eda_alpha", 1.5, "[0.0, 1.0]"),
    ("eda_p", float("nan"), "[0.0, 1.0]"),
    ("eda_synonyms", "wordnik", "auto, nltk, wordnet, table, off"),
]

INT_FIELDS = [
    "pool_size",
    "defend_every",
    "first_defended_epoch",
    "image_aug_stop_epoch",
    "ramp_final_every",
    "period_steps",
    "match_chunk_size",
    "ivf_nlist",
    "ivf_nprobe",
    "seed",
]
FLOAT_FIELDS = [
    "warmup_fraction",
    "image_aug_stop_fraction",
    "adaptive_threshold",
    "match_fraction",
    "suspicious_margin",
    "eda_alpha",
    "eda_p",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train", exit_on_error=False)
    add_argparse_args(parser)
    return parser


def _parse(argv: list[str]) -> RoClipConfig:
    return config_from_namespace(_parser().parse_args(argv))


FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "pool_size": st.integers(1, INT32_MAX),
    "defend_every": st.integers(1, 64),
    "first_defended_epoch": st.none() | st.integers(0, INT32_MAX),
    "warmup_fraction": st.none() | st.floats(0.0, 1.0, exclude_max=True),
    "schedule": st.sampled_from(SCHEDULES),
    "ramp_final_every": st.integers(1, 64),  # clipped to defend_every below
    "adaptive_threshold": st.floats(0.0, 1.0, exclude_min=True),
    "period_steps": st.integers(0, INT32_MAX),
    "pool_update": st.sampled_from(POOL_UPDATES),
    "match_fraction": st.floats(0.0, 1.0, exclude_min=True),
    "match_action": st.sampled_from(MATCH_ACTIONS),
    "duplicate_matches": st.sampled_from(DUPLICATE_MATCHES),
    "risky_negatives": st.sampled_from(RISKY_NEGATIVES),
    "precision": st.sampled_from(PRECISIONS),
    "matcher": st.sampled_from(MATCHERS),
    "match_chunk_size": st.integers(0, INT32_MAX),
    "ivf_nlist": st.integers(1, INT32_MAX),
    "ivf_nprobe": st.integers(1, INT32_MAX),
    "seed": st.integers(0, 2**63 - 1),
    "suspicious_margin": st.floats(0.0, 2.0),
    "image_aug": st.sampled_from(["roclip", "none"]),
    "text_aug": st.sampled_from(["eda", "none"]),
    "image_aug_refresh": st.sampled_from(AUG_REFRESH),
    "image_aug_stop_epoch": st.none() | st.integers(0, INT32_MAX),
    "image_aug_stop_fraction": st.none() | st.floats(0.0, 1.0, exclude_min=True),
    "text_aug_refresh": st.sampled_from(AUG_REFRESH),
    "eda_alpha": st.floats(0.0, 1.0),
    "eda_p": st.floats(0.0, 1.0),
    "eda_synonyms": st.sampled_from(SYNONYM_SOURCES),
    "risk_score": st.sampled_from(["margin", "cosine", "history", "density"]),
    "risk_split": st.sampled_from(["fixed", "gmm"]),
    "risk_weight": st.floats(0.0, 1.0, exclude_max=True),
    "history_slots": st.integers(0, 2**40),
    "history_decay": st.floats(0.0, 1.0, exclude_min=True),
    "density_k": st.integers(1, 64),
    "image_bank_size": st.integers(64, INT32_MAX),
    "gmm_threshold": st.floats(0.0, 1.0, exclude_min=True),
    "gmm_window": st.integers(4, INT32_MAX),
    "safe_share_start": st.floats(0.0, 1.0),
    "safe_share_growth": st.floats(0.0, 1.0),
    "unimodal_warmup_epochs": st.integers(0, INT32_MAX),
}


@st.composite
def configs(draw: st.DrawFn) -> RoClipConfig:
    values = {name: draw(strategy) for name, strategy in FIELD_STRATEGIES.items()}
    values["ramp_final_every"] = min(values["ramp_final_every"], values["defend_every"])
    if values["match_fraction"] == 1.0 and values["risk_split"] == "fixed":
        values["match_action"] = "match"  # the other actions need a fraction below 1
    return RoClipConfig(**values)


def test_config_strategy_covers_every_field() -> None:
    assert set(FIELD_STRATEGIES) == set(field_names())


# -- validation --------------------------------------------------------------------------------


def test_defaults_are_valid_and_documented_values() -> None:
    """The default is the robust preset: the history split from the second epoch on."""
    cfg = RoClipConfig()
    assert cfg == RoClipConfig.from_preset("robust")
    assert cfg.pool_size == 21845
    assert cfg.defend_every == 1
    assert cfg.first_defended_epoch == 1
    assert (cfg.risk_score, cfg.risk_split) == ("history", "fixed")
    assert (cfg.match_action, cfg.match_fraction) == ("drop", 0.1)
    assert cfg.schedule == "periodic"
    assert cfg.pool_update == "every_step"
    assert cfg.precision == "fp32"
    assert cfg.matcher == "torch"
    assert cfg.resolved_first_epoch() == 1


def test_the_paper_preset_keeps_the_papers_schedule_and_matching() -> None:
    cfg = RoClipConfig.from_preset("paper")
    assert (cfg.first_defended_epoch, cfg.defend_every) == (5, 2)
    assert (cfg.match_action, cfg.match_fraction, cfg.risk_score) == ("match", 1.0, "margin")


def test_every_field_has_a_bad_value_case() -> None:
    assert {name for name, _, _ in BAD_VALUES} == set(field_names())


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_VALUES)
def test_bad_value_error_names_field_flag_value_and_range(
    name: str, value: Any, allowed: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{name} ({flag_name(name)})")) as info:
        RoClipConfig(**{name: value})
    message = str(info.value)
    assert flag_name(name) in message
    assert repr(value) in message
    assert allowed in message


@pytest.mark.parametrize("name", INT_FIELDS + FLOAT_FIELDS)
@pytest.mark.parametrize("value", [True, False])
def test_bools_are_refused_for_numbers(name: str, value: bool) -> None:
    with pytest.raises(ValueError, match=re.escape(flag_name(name))) as info:
        RoClipConfig(**{name: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"pool_size": 1},
        {"pool_size": INT32_MAX},
        {"first_defended_epoch": 0},
        {"first_defended_epoch": None},
        {"warmup_fraction": 0.0},
        {"warmup_fraction": 0.999},
        {"adaptive_threshold": 1.0},
        {"adaptive_threshold": 1e-9},
        {"defend_every": 7, "ramp_final_every": 7},
        {"period_steps": 0},
        {"seed": 2**63 - 1},
        {"matcher": "faiss-ivf", "ivf_nlist": 1, "ivf_nprobe": 1},
    ],
)
def test_boundary_values_are_accepted(changes: dict[str, Any]) -> None:
    cfg = RoClipConfig(**changes)
    for name, value in changes.items():
        assert getattr(cfg, name) == value


def test_ramp_final_every_bound_follows_defend_every() -> None:
    assert RoClipConfig(defend_every=5, ramp_final_every=5).ramp_final_every == 5
    with pytest.raises(ValueError, match=re.escape("--roclip-ramp-final-every")) as info:
        RoClipConfig(defend_every=5, ramp_final_every=6)
    assert "[1, 5]" in str(info.value)


def test_config_is_frozen_and_replace_validates() -> None:
    cfg = RoClipConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pool_size = 3  # type: ignore[misc]
    assert cfg.replace(pool_size=3).pool_size == 3
    assert cfg.pool_size == 21845
    with pytest.raises(ValueError, match="--roclip-pool-size"):
        cfg.replace(pool_size=0)


# -- presets -----------------------------------------------------------------------------------


def test_default_preset_is_the_dataclass_default() -> None:
    assert RoClipConfig.from_preset() == RoClipConfig()
    assert RoClipConfig.from_preset("default") == RoClipConfig()


@given(every=st.integers(1, 1000))
@settings(max_examples=50, deadline=None)
def test_reference_preset_uses_authors_numbering(every: int) -> None:
    cfg = RoClipConfig.from_preset("reference", defend_every=every)
    assert cfg.first_defended_epoch is None
    assert cfg.warmup_fraction is None
    assert cfg.schedule == "periodic"
    assert cfg.pool_update == "defended_epochs"
    assert cfg.duplicate_matches == "keep"  # the authors' loss leaves duplicates as they are
    assert cfg.resolved_first_epoch() == every - 1
    assert cfg.resolved_first_epoch(total_epochs=10_000) == every - 1


def test_reference_preset_overrides_win() -> None:
    cfg = RoClipConfig.from_preset("reference", first_defended_epoch=4, pool_update="every_step")
    assert cfg.first_defended_epoch == 4
    assert cfg.pool_update == "every_step"
    assert cfg.resolved_first_epoch() == 4


def test_from_preset_unknown_name() -> None:
    with pytest.raises(ValueError, match=re.escape("--roclip-preset")) as info:
        RoClipConfig.from_preset("authors")
    assert "'authors'" in str(info.value)
    assert "default, paper, reference, safeclip, robust" in str(info.value)


def test_from_preset_unknown_field() -> None:
    with pytest.raises(
        ValueError, match=re.escape("unknown RoCLIP option(s) ['bogus', 'poolsize']")
    ):
        RoClipConfig.from_preset("default", poolsize=3, bogus=1)
    with pytest.raises(ValueError, match="unknown RoCLIP option"):
        RoClipConfig.from_preset("reference", preset="default")


def test_from_preset_overrides_are_validated() -> None:
    with pytest.raises(ValueError, match="--roclip-defend-every"):
        RoClipConfig.from_preset("reference", defend_every=0)


# -- warm-up fraction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "total", "first"),
    [(0.0, 10, 0), (0.5, 10, 5), (0.25, 10, 3), (0.3, 7, 3), (0.01, 1, 1), (0.999, 1000, 999)],
)
def test_warmup_fraction_resolves_to_ceiling(fraction: float, total: int, first: int) -> None:
    cfg = RoClipConfig(warmup_fraction=fraction, first_defended_epoch=17)
    assert cfg.resolved_first_epoch(total) == first


@given(fraction=st.floats(0.0, 1.0, exclude_max=True), total=st.integers(1, 10**6))
@settings(max_examples=100, deadline=None)
def test_warmup_fraction_is_ceiling_and_inside_the_run(fraction: float, total: int) -> None:
    # ceil(fraction * total), allowing only for the float rounding of the product
    first = RoClipConfig(warmup_fraction=fraction).resolved_first_epoch(total)
    product = fraction * total
    assert isinstance(first, int)
    assert product - 1e-9 * max(1.0, product) <= first
    assert first - 1 < product
    assert first in (math.ceil(product), math.floor(product))
    assert 0 <= first <= total


def test_warmup_fraction_decimal_percentages_are_exact() -> None:
    # A user who writes --roclip-warmup-fraction 0.07 for 100 epochs means 7 warm-up epochs;
    # the float product 0.07 * 100 == 7.000000000000001 must not turn that into 8.
    wrong = []
    for percent in range(100):
        cfg = RoClipConfig(warmup_fraction=percent / 100)
        for total in range(1, 201):
            want = -(-percent * total // 100)
            got = cfg.resolved_first_epoch(total)
            if got != want:
                wrong.append((percent / 100, total, got, want))
    assert not wrong, f"(fraction, total, got, want): {wrong[:6]} ({len(wrong)} cases)"


def test_warmup_fraction_needs_total_epochs() -> None:
    cfg = RoClipConfig(warmup_fraction=0.2)
    with pytest.raises(
        ValueError, match=re.escape("--roclip-warmup-fraction needs the run length")
    ):
        cfg.resolved_first_epoch()
    with pytest.raises(ValueError, match="total_epochs"):
        cfg.resolved_first_epoch(None)


def test_first_defended_epoch_ignores_total_without_warmup() -> None:
    assert RoClipConfig(first_defended_epoch=3).resolved_first_epoch(100) == 3
    assert RoClipConfig(first_defended_epoch=None, defend_every=4).resolved_first_epoch() == 3


# -- field <-> flag mapping --------------------------------------------------------------------


@given(name=st.sampled_from(field_names()))
@settings(max_examples=50, deadline=None)
def test_flag_round_trip(name: str) -> None:
    flag = flag_name(name)
    assert flag.startswith(FLAG_PREFIX)
    assert "_" not in flag
    assert field_from_flag(flag) == name


def test_flag_mapping_is_one_to_one_and_in_field_order() -> None:
    names = field_names()
    flags = all_flags()
    assert len(names) == len(set(names)) == len(flags) == len(set(flags))
    assert flags == [flag_name(n) for n in names]
    assert [field_from_flag(f) for f in flags] == names
    assert FLAG_PREFIX + "preset" not in flags
    assert flag_name("pool_size") == "--roclip-pool-size"
    assert field_from_flag("--roclip-first-defended-epoch") == "first_defended_epoch"


@pytest.mark.parametrize(
    "flag", ["--pool-size", "--roclip_pool_size", "pool_size", "-roclip-pool-size"]
)
def test_foreign_flag_is_refused(flag: str) -> None:
    with pytest.raises(ValueError, match="is not a RoCLIP flag"):
        field_from_flag(flag)


@pytest.mark.parametrize("flag", ["--roclip-bogus", "--roclip-preset", "--roclip-pool-size-x"])
def test_unknown_roclip_flag_is_refused(flag: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"unknown RoCLIP flag {flag!r}")) as info:
        field_from_flag(flag)
    assert "--roclip-pool-size" in str(info.value)


# -- argparse ----------------------------------------------------------------------------------


def test_parser_has_every_flag_and_preset() -> None:
    parser = _parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert set(all_flags()) | {"--roclip-preset"} <= options


def test_no_flags_gives_default_preset() -> None:
    ns = _parser().parse_args([])
    assert ns.roclip_preset == "default"
    for name in field_names():
        assert not hasattr(ns, "roclip_" + name)
    assert config_from_namespace(ns) == RoClipConfig()


def test_unparsed_flag_is_absent_from_namespace() -> None:
    ns = _parser().parse_args(["--roclip-pool-size", "64"])
    assert ns.roclip_pool_size == 64
    assert not hasattr(ns, "roclip_defend_every")
    assert not hasattr(ns, "roclip_first_defended_epoch")


def test_preset_first_then_explicit_flags() -> None:
    cfg = _parse(["--roclip-preset", "reference", "--roclip-pool-size", "128"])
    assert cfg == RoClipConfig.from_preset("reference", pool_size=128)
    assert cfg.first_defended_epoch is None
    assert cfg.pool_update == "defended_epochs"

    cfg = _parse(["--roclip-pool-update", "every_step", "--roclip-preset", "reference"])
    assert cfg.pool_update == "every_step"  # explicit flag beats the preset, whatever the order
    assert cfg.first_defended_epoch is None

    cfg = _parse(["--roclip-preset", "reference", "--roclip-first-defended-epoch", "7"])
    assert cfg.first_defended_epoch == 7
    assert cfg.resolved_first_epoch() == 7


@pytest.mark.parametrize("text", ["none", "None", "NONE"])
def test_first_defended_epoch_none_is_an_explicit_none(text: str) -> None:
    cfg = _parse(["--roclip-first-defended-epoch", text, "--roclip-defend-every", "3"])
    assert cfg.first_defended_epoch is None
    assert cfg.resolved_first_epoch() == 2
    assert cfg.pool_update == "every_step"  # still the default preset otherwise


def test_optional_float_flag_parses_none_and_numbers() -> None:
    assert _parse(["--roclip-warmup-fraction", "0.25"]).warmup_fraction == 0.25
    cfg = _parse(["--roclip-warmup-fraction", "none"])
    assert cfg.warmup_fraction is None


def test_parsed_values_have_field_types() -> None:
    cfg = _parse(
        [
            "--roclip-pool-size",
            "10",
            "--roclip-adaptive-threshold",
            "0.75",
            "--roclip-schedule",
            "adaptive",
            "--roclip-matcher",
            "faiss-ivf",
        ]
    )
    assert cfg.pool_size == 10 and type(cfg.pool_size) is int
    assert cfg.adaptive_threshold == 0.75 and type(cfg.adaptive_threshold) is float
    assert cfg.schedule == "adaptive"
    assert cfg.matcher == "faiss-ivf"


def test_parse_errors_and_validation_errors() -> None:
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--roclip-schedule", "cosine"])
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(["--roclip-pool-size", "many"])
    ns = _parser().parse_args(["--roclip-pool-size", "0"])
    with pytest.raises(ValueError, match=re.escape("pool_size (--roclip-pool-size)")):
        config_from_namespace(ns)


def test_flags_work_in_an_argument_group() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-3)
    add_argparse_args(parser.add_argument_group("RoCLIP"))
    ns = parser.parse_args(["--lr", "0.1", "--roclip-defend-every", "4"])
    assert ns.lr == 0.1
    assert config_from_namespace(ns) == RoClipConfig(defend_every=4)


def test_namespace_without_preset_attribute_uses_default() -> None:
    ns = argparse.Namespace(roclip_pool_size=9)
    assert config_from_namespace(ns) == RoClipConfig(pool_size=9)


# -- round trips -------------------------------------------------------------------------------


@given(cfg=configs())
@settings(max_examples=100, deadline=None)
def test_config_to_argv_round_trip(cfg: RoClipConfig) -> None:
    argv = config_to_argv(cfg)
    assert argv[::2] == all_flags()
    assert all(isinstance(a, str) for a in argv)
    assert _parse(argv) == cfg


def test_config_to_argv_of_reference_preset_round_trips() -> None:
    cfg = RoClipConfig.from_preset("reference", defend_every=3, warmup_fraction=None)
    argv = config_to_argv(cfg)
    assert argv[argv.index("--roclip-first-defended-epoch") + 1] == "none"
    assert _parse(argv) == cfg


@given(cfg=configs())
@settings(max_examples=100, deadline=None)
def test_to_dict_from_dict_round_trip(cfg: RoClipConfig) -> None:
    data = cfg.to_dict()
    assert list(data) == field_names()
    assert RoClipConfig.from_dict(data) == cfg
    assert RoClipConfig.from_dict(json.loads(json.dumps(data))) == cfg


def test_from_dict_rejects_unknown_keys() -> None:
    data = RoClipConfig().to_dict()
    data["poolsize"] = 3
    with pytest.raises(ValueError, match="unknown RoCLIP option"):
        RoClipConfig.from_dict(data)


def test_from_dict_partial_uses_defaults() -> None:
    assert RoClipConfig.from_dict({"seed": 3}) == RoClipConfig(seed=3)


def test_numpy_and_tensor_numbers_are_accepted_and_stored_as_python() -> None:
    import numpy as np
    import torch

    config = RoClipConfig(
        pool_size=np.int64(64),
        defend_every=torch.tensor(3),
        eda_alpha=np.float32(0.25),
        suspicious_margin=torch.tensor(0.5),
    )
    assert (config.pool_size, config.defend_every) == (64, 3)
    assert type(config.pool_size) is int and type(config.defend_every) is int
    assert type(config.eda_alpha) is float and config.eda_alpha == 0.25
    assert type(config.suspicious_margin) is float
    for bad in (np.bool_(True), torch.ones(2, dtype=torch.int64), torch.tensor(3.0), 3.0):
        with pytest.raises(ValueError, match="pool_size"):
            RoClipConfig(pool_size=bad)


def test_optional_int_flag_has_a_plain_message(capsys) -> None:
    parser = argparse.ArgumentParser(prog="t")
    add_argparse_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--roclip-first-defended-epoch", "x"])
    err = capsys.readouterr().err
    assert "argument --roclip-first-defended-epoch: expected an integer or 'none', got 'x'" in err
    assert "_optional_int" not in err


def test_help_texts_hold_no_argparse_escapes() -> None:
    """Field help is plain text (``%`` once); only argparse's copy escapes it."""
    from dataclasses import fields

    for f in fields(RoClipConfig):
        assert "%%" not in f.metadata["help"], f.name


def test_drop_needs_a_match_fraction_below_one() -> None:
    with pytest.raises(ValueError, match="--roclip-match-fraction below 1"):
        RoClipConfig(match_action="drop", match_fraction=1.0)
    assert RoClipConfig(match_action="drop", match_fraction=0.2).match_action == "drop"


def test_precision_claims_state_the_float32_tolerance() -> None:
    """bf16 is not "the same answer as fp32" for near-ties: the help and docs say what holds."""
    from pathlib import Path

    from roclip_plugin.config import RoClipConfig

    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(RoClipConfig)}["precision"]
    assert "same answer as fp32" not in help_text
    assert "float32 rounding" in help_text
    docs = Path(__file__).resolve().parents[1] / "docs"
    for name in ("config.md", "openclip.md"):
        assert "same answer as fp32" not in (docs / name).read_text(), name


def test_every_field_declares_what_it_allows_and_the_check_reads_it() -> None:
    """Choices or a range, beside the field: the lowest integer passes, one below is refused,
    and a number outside an interval is refused with the interval the metadata declares."""
    from roclip_plugin.config import Ints, Reals, Registered
    from roclip_plugin.validation import interval_text

    kinds = {Ints: 0, Reals: 0, Registered: 0}
    for f in dataclasses.fields(RoClipConfig):
        allowed, choices = f.metadata["allowed"], f.metadata["choices"]
        assert (allowed is None) != (choices is None), f.name
        if choices:
            continue
        kinds[type(allowed)] += 1
        if isinstance(allowed, Ints):
            low, _ = allowed.bounds(RoClipConfig())
            assert getattr(RoClipConfig(**{f.name: low}), f.name) == low
            with pytest.raises(ValueError, match=re.escape(f"{flag_name(f.name)}): invalid")):
                RoClipConfig(**{f.name: low - 1})
        elif isinstance(allowed, Reals):
            bounds = {"low_open": allowed.low_open, "high_open": allowed.high_open}
            with pytest.raises(
                ValueError, match=re.escape(interval_text(allowed.low, allowed.high, **bounds))
            ):
                RoClipConfig(**{f.name: allowed.high + 1})
    assert all(kinds.values()), kinds
