"""The help of ``roclip``'s own commands shows the defaults that run (one source for both)."""

from __future__ import annotations

from pathlib import Path

from roclip_plugin import RoClipConfig, get_plugin_manager
from roclip_plugin.cli import build_parser, smoke_defaults
from roclip_plugin.config import config_from_namespace, field_from_flag
from roclip_plugin.smoke import DemoSettings
from roclip_plugin.testing import as_shown, assert_help_shows_defaults, shown_defaults, subcommand


def test_smoke_help_shows_what_runs() -> None:
    parser = subcommand(build_parser(get_plugin_manager()), "smoke")
    assert_help_shows_defaults(parser)
    args = parser.parse_args([])
    runs = config_from_namespace(args, smoke_defaults(DemoSettings(train=args.train).pairs))
    shown = shown_defaults(parser)
    roclip = {flag: text for flag, text in shown.items() if flag.startswith("--roclip-")}
    assert len(roclip) == len(RoClipConfig.__dataclass_fields__) + 1  # and --roclip-preset
    for flag, text in roclip.items():
        if flag == "--roclip-preset":
            continue
        value = as_shown(getattr(runs, field_from_flag(flag)))
        if flag == "--roclip-pool-size":  # depends on --train: the share and its default figure
            assert text.startswith("10% of the training pairs, ") and f" {value} " in text
        else:
            assert text == value, flag


def test_flags_and_top_level_help() -> None:
    parser = build_parser(get_plugin_manager())
    assert_help_shows_defaults(subcommand(parser, "flags"))
    assert "``" not in parser.format_help() and ":class:" not in parser.format_help()


def test_as_shown() -> None:
    assert as_shown(Path("roclip-demo")) == "roclip-demo" and as_shown([10, 50]) == "10,50"
    assert as_shown("\t") == "tab" and as_shown(None) == "none"
