"""The old names of the schedule's settings keep working, each warning with its new name.

``first_rematch_epoch`` / ``first_match_epoch`` -> ``first_defended_epoch``, ``rematch_every``
-> ``defend_every``, ``pool_update=matching_epochs`` -> ``defended_epochs``: as keywords, dict
keys, attributes, flags of every entry point, and keys of saved state.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from roclip_plugin.config import (
    RoClipConfig,
    add_argparse_args,
    all_flags,
    config_from_namespace,
    field_from_flag,
)
from roclip_plugin.config_aliases import FIELD_ALIASES, VALUE_ALIASES
from roclip_plugin.defense import RoClipDefense

OLD_VALUES = {"first_rematch_epoch": 3, "first_match_epoch": 3, "rematch_every": 2}
NEW_VALUES = {FIELD_ALIASES[old]: value for old, value in OLD_VALUES.items()}


def _flag(name: str) -> str:
    return "--roclip-" + name.replace("_", "-")


def _warns_new_name(new: str) -> Any:
    """``pytest.warns`` for one FutureWarning naming ``new``."""
    return pytest.warns(FutureWarning, match=f"use '{new}'")


def test_the_alias_table_covers_the_names_the_issue_lists() -> None:
    assert set(OLD_VALUES) == set(FIELD_ALIASES)
    assert VALUE_ALIASES == {"pool_update": {"matching_epochs": "defended_epochs"}}
    assert not any("rematch" in flag or "matching" in flag for flag in all_flags())


@pytest.mark.parametrize("old", sorted(OLD_VALUES))
@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: RoClipConfig(**kw),
        lambda **kw: RoClipConfig.from_preset("paper", **kw),
        lambda **kw: RoClipConfig.from_dict(kw),
        lambda **kw: RoClipConfig().replace(**kw),
    ],
    ids=["init", "from_preset", "from_dict", "replace"],
)
def test_old_keyword_works_and_warns(old: str, build: Callable[..., RoClipConfig]) -> None:
    new = FIELD_ALIASES[old]
    with _warns_new_name(new) as record:
        config = build(**{old: OLD_VALUES[old]})
    assert getattr(config, new) == OLD_VALUES[old]
    assert len([w for w in record if issubclass(w.category, FutureWarning)]) == 1  # once


@pytest.mark.parametrize("old", sorted(OLD_VALUES))
def test_old_attribute_reads_the_new_field(old: str) -> None:
    config = RoClipConfig(**{FIELD_ALIASES[old]: OLD_VALUES[old]})
    with _warns_new_name(f"RoClipConfig.{FIELD_ALIASES[old]}"):
        assert getattr(config, old) == OLD_VALUES[old]


def test_old_and_new_name_together_are_refused() -> None:
    with pytest.raises(ValueError, match="beside its new name 'defend_every'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            RoClipConfig.from_preset("default", rematch_every=2, defend_every=3)


def test_old_pool_update_value_works_and_warns() -> None:
    with _warns_new_name("defended_epochs"):
        config = RoClipConfig(pool_update="matching_epochs")
    assert config.pool_update == "defended_epochs"
    assert config == RoClipConfig.from_preset("default", pool_update="defended_epochs")
    assert RoClipConfig.from_preset("reference").pool_update == "defended_epochs"


def test_old_names_build_the_same_config_as_new_ones() -> None:
    """The reference preset written the old way (a config file of before the rename)."""
    old = {**OLD_VALUES, "pool_update": "matching_epochs"}
    del old["first_match_epoch"]
    with pytest.warns(FutureWarning):
        config = RoClipConfig.from_dict(old)
    assert config == RoClipConfig.from_dict(
        {"first_defended_epoch": 3, "defend_every": 2, "pool_update": "defended_epochs"}
    )


@pytest.mark.parametrize("old", sorted(OLD_VALUES))
def test_field_from_old_flag(old: str) -> None:
    with _warns_new_name(_flag(FIELD_ALIASES[old])):
        assert field_from_flag(_flag(old)) == FIELD_ALIASES[old]


# -- every entry point's flags ------------------------------------------------------------------


def _plain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_argparse_args(parser)
    return parser


def _roclip_smoke_parser() -> Callable[[list[str]], argparse.Namespace]:
    from roclip_plugin.cli import build_parser

    parser = build_parser()
    return lambda argv: parser.parse_args(["smoke", *argv])


def _openclip_parser() -> argparse.ArgumentParser:
    pytest.importorskip("open_clip_train")
    from roclip_openclip.cli import build_parser

    from roclip_plugin.plugins import get_plugin_manager

    return build_parser(get_plugin_manager())


def _torch_loop_parser() -> argparse.ArgumentParser:
    from roclip_torch import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _demo_parser() -> argparse.ArgumentParser:
    from roclip_kit.commands.demo import add_demo_command

    return add_demo_command(argparse.ArgumentParser().add_subparsers())


ENTRY_POINTS = {
    "add_argparse_args": lambda: _plain_parser().parse_args,
    "roclip smoke": _roclip_smoke_parser,
    "roclip-openclip-train": lambda: lambda a: _openclip_parser().parse_known_args(a)[0],
    "roclip_torch.add_arguments": lambda: _torch_loop_parser().parse_args,
    "roclip demo": lambda: _demo_parser().parse_args,
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("old", sorted(OLD_VALUES))
def test_every_entry_point_takes_the_old_flags(entry: str, old: str) -> None:
    parse = ENTRY_POINTS[entry]()
    new = FIELD_ALIASES[old]
    with _warns_new_name(_flag(new)):
        args = parse([_flag(old), str(OLD_VALUES[old])])
    assert getattr(args, "roclip_" + new) == OLD_VALUES[old]
    assert getattr(config_from_namespace(args), new) == OLD_VALUES[old]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_takes_the_old_pool_update_value(entry: str) -> None:
    parse = ENTRY_POINTS[entry]()
    with _warns_new_name("defended_epochs"):
        args = parse(["--roclip-pool-update", "matching_epochs"])
    assert config_from_namespace(args).pool_update == "defended_epochs"


def test_old_flag_none_and_help() -> None:
    parser = _plain_parser()
    with _warns_new_name("--roclip-first-defended-epoch"):
        args = parser.parse_args(["--roclip-first-rematch-epoch", "none"])
    assert config_from_namespace(args).first_defended_epoch is None
    shown = parser.format_help()
    assert "--roclip-first-defended-epoch" in shown and "rematch" not in shown


def test_kit_roclip_flags_become_the_new_flags() -> None:
    from roclip_kit.train.openclip import roclip_args

    with _warns_new_name("defend_every"):
        argv = roclip_args({"rematch_every": 2, "pool_size": 64})
    assert argv == ["--roclip-defend-every", "2", "--roclip-pool-size", "64"]


# -- saved state ---------------------------------------------------------------------------------


def _old_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as a checkpoint written before the rename holds it."""
    renamed = {"first_defended_epoch": "first_rematch_epoch", "defend_every": "rematch_every"}
    old = {renamed.get(key, key): value for key, value in config.items()}
    if old["pool_update"] == "defended_epochs":
        old["pool_update"] = "matching_epochs"
    return old


def test_defense_state_with_old_keys_loads() -> None:
    config = RoClipConfig.from_preset("reference", pool_size=8, defend_every=2)
    defense = RoClipDefense(config)
    defense.start_epoch(1)
    img = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    defense.compute_loss(img, txt, torch.tensor(10.0))
    state = defense.state_dict()
    state["config"] = _old_keys(state["config"])
    assert "rematch_every" in state["config"]
    assert state["config"]["pool_update"] == "matching_epochs"

    resumed = RoClipDefense(config)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resumed.load_state_dict(state)
    messages = [str(w.message) for w in record]
    assert not [w for w in record if w.category is RuntimeWarning], messages  # no drift
    assert any("use 'defend_every'" in m for m in messages)
    assert any("use 'defended_epochs'" in m for m in messages)
    assert resumed.state_dict()["pool"]["total_written"] == state["pool"]["total_written"]
    assert resumed.epoch == 1 and resumed.matching == defense.matching


def test_kit_checkpoint_of_old_keys_resumes(tmp_path: Any) -> None:
    from roclip_kit.train.checkpoint import TensorCheckpoints

    config = RoClipConfig(defend_every=2, pool_update="defended_epochs").to_dict()
    identity = {"settings": {"epochs": 2}, "roclip": config, "defend": True, "data": {"rows": 4}}
    TensorCheckpoints(tmp_path, {**identity, "roclip": _old_keys(config)}).save(1, {"x": 1})
    with pytest.warns(FutureWarning) as record:
        path, state = TensorCheckpoints(tmp_path, identity).load_latest()  # no StateError
    assert state["x"] == 1 and path.name == "epoch_1.pt"
    assert {str(w.message).split("use ")[1] for w in record} == {
        "'first_defended_epoch' (same meaning)",
        "'defend_every' (same meaning)",
        "'defended_epochs' (same meaning)",
    }


def test_saved_runs_read_defended_epochs_under_either_key() -> None:
    from roclip_plugin.config_aliases import saved_defended_epochs

    assert saved_defended_epochs({"matching_epochs": [4, 6]}) == [4, 6]  # before the rename
    assert saved_defended_epochs({"defended_epochs": [1], "matching_epochs": [4]}) == [1]
    assert saved_defended_epochs({}, []) == [] and saved_defended_epochs({}) is None
