"""The help of the kit's commands shows the defaults that run: argparse's own defaults, and
for ``roclip demo`` every scale's sizes and RoCLIP defaults, read from the scale tables."""

from __future__ import annotations

import re

import pytest
import roclip_kit.plugin
from roclip_kit.demo.settings import OPENCLIP_SCALES, SCALES, DemoSettings, scaled_flags

from roclip_plugin import RoClipConfig, get_plugin_manager
from roclip_plugin.cli import build_parser
from roclip_plugin.config import field_from_flag
from roclip_plugin.testing import as_shown, assert_help_shows_defaults, shown_defaults, subcommand


def _parser():
    pm = get_plugin_manager(autoload=False)
    pm.register(roclip_kit.plugin)
    return build_parser(pm)


@pytest.mark.parametrize("command", ["data", "poison", "eval", "demo", "scan"])
def test_plain_defaults_are_the_defaults_used(command) -> None:
    assert_help_shows_defaults(subcommand(_parser(), command))


def _per_scale(text: str) -> dict[tuple[str, str], str]:
    """``cpu 4096, gpu 4096; --trainer openclip: cpu 2048, gpu 16384`` by (trainer, scale)."""
    values = {}
    for part in text.split("; "):
        trainer = "openclip" if part.startswith("--trainer openclip: ") else "tensor"
        for cell in part.removeprefix("--trainer openclip: ").split(", "):
            scale, _, value = cell.partition(" ")
            values[(trainer, scale)] = value
    return values


def _cases() -> list[tuple[str, str]]:
    return [("tensor", s) for s in SCALES] + [("openclip", s) for s in OPENCLIP_SCALES]


def test_demo_sizes_help_is_what_each_scale_runs() -> None:
    parser = subcommand(_parser(), "demo")
    helps = {a.option_strings[-1]: " ".join(a.help.split()) for a in parser._actions if a.help}
    flags = ["--train-limit", "--test-limit", "--attribute-rate", "--epochs", "--batch-size",
             "--lr", "--model", "--eval-limit", "--targets", "--captions-per-target",
             "--backdoor-rate"]  # fmt: skip
    for flag in flags:
        text = re.search(r"\(((?:cpu|gpu) [^()]*)\)$", helps[flag]).group(1)
        shown = _per_scale(text)
        for trainer, scale in _cases():
            s = DemoSettings(trainer=trainer, scale=scale).resolved()
            value = getattr(s, flag[2:].replace("-", "_"))
            assert shown[(trainer, scale)] == ("all" if value is None else as_shown(value)), (
                flag, trainer, scale)  # fmt: skip


def test_demo_roclip_help_is_what_each_scale_runs() -> None:
    shown = shown_defaults(subcommand(_parser(), "demo"))
    base = RoClipConfig()
    for flag, text in shown.items():
        if not flag.startswith("--roclip-") or flag == "--roclip-preset":
            continue
        name = field_from_flag(flag)
        if name not in scaled_flags(None):
            assert text == as_shown(getattr(base, name)), flag
            continue
        values = _per_scale(text.removeprefix("the scale's: "))
        for trainer, scale in _cases():
            flags = DemoSettings(trainer=trainer, scale=scale).resolved().roclip_flags
            runs = RoClipConfig.from_preset("default", **flags)
            assert values[(trainer, scale)] == as_shown(getattr(runs, name)), (flag, scale)
