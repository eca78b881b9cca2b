from __future__ import annotations

import roclip_kit.plugin

from roclip_plugin import get_plugin_manager
from roclip_plugin.cli import build_parser


def test_kit_commands_join_the_roclip_command() -> None:
    pm = get_plugin_manager(autoload=False)
    pm.register(roclip_kit.plugin)
    parser = build_parser(pm)
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"smoke", "flags", "demo", "data", "poison", "eval", "scan"} <= set(commands)
    args = parser.parse_args(["demo", "--dataset", "digits", "--roclip-pool-size", "64"])
    assert args.run.__name__ == "run_demo_command"
    assert args.roclip_pool_size == 64


def test_without_the_kit_there_is_no_demo_command() -> None:
    parser = build_parser(get_plugin_manager(autoload=False))
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert "demo" not in commands and "smoke" in commands


def test_the_kit_is_an_entry_point_plugin() -> None:
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="roclip")}
    assert "roclip_kit.plugin" in names


def test_missing_kit_dependency_gives_commands_that_say_how_to_install(monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL.") or name.startswith("roclip_kit.commands"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="PIL")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    pm = get_plugin_manager(autoload=False)
    pm.register(roclip_kit.plugin)
    from roclip_plugin.cli import main

    assert main(["demo", "--epochs", "3"], pm=pm) == 2
    out = capsys.readouterr().out
    assert "needs PIL" in out and 'pip install "roclip-plugin[kit]"' in out
    assert main(["flags"], pm=pm) == 0  # the core's commands keep working
