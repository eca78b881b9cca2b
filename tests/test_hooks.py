"""Every hook is documented with its exact signature, and every hook is exercised here."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import roclip_plugin
from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager, hookimpl, hookspecs
from roclip_plugin.plugins import AUTOLOAD_ENV, collect_augmentations

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"


def render(name: str) -> str:
    sig = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


@pytest.mark.parametrize("name", hookspecs.spec_names())
def test_every_hook_is_documented_with_its_exact_signature(name: str) -> None:
    assert f"`{render(name)}`" in DOCS.read_text()


def test_every_hook_has_a_test_here() -> None:
    source = Path(__file__).read_text()
    missing = [n for n in hookspecs.spec_names() if f"def test_{n}" not in source]
    assert not missing, f"hooks without a test_<hook> test: {missing}"


def test_markers_and_reexport() -> None:
    assert roclip_plugin.hookimpl is hookspecs.hookimpl
    assert hookspecs.hookimpl.project_name == "roclip"
    assert all(n.startswith("roclip_") for n in hookspecs.spec_names())


def _features(batch: int = 8, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
    return img, torch.nn.functional.normalize(img + 0.3 * torch.randn(batch, dim), dim=-1)


def _defense(*plugins: object, **config: object) -> RoClipDefense:
    pm = get_plugin_manager()
    for plugin in plugins:
        pm.register(plugin)
    cfg = RoClipConfig.from_preset(
        "paper", **{"pool_size": 32, "first_defended_epoch": 1, "defend_every": 1, **config}
    )
    return RoClipDefense(cfg, plugin_manager=pm)


def test_roclip_add_options() -> None:
    class Plugin:
        @hookimpl
        def roclip_add_options(self, parser):
            parser.add_argument("--roclip-myplugin-level", type=int, default=3)

    pm = get_plugin_manager()
    pm.register(Plugin())
    parser = argparse.ArgumentParser()
    pm.hook.roclip_add_options(parser=parser)
    assert parser.parse_args(["--roclip-myplugin-level", "7"]).roclip_myplugin_level == 7


def test_roclip_configure() -> None:
    seen = []

    class Plugin:
        @hookimpl
        def roclip_configure(self, config, options):
            seen.append((config, options))

    options = argparse.Namespace(x=1)
    pm = get_plugin_manager()
    pm.register(Plugin())
    cfg = RoClipConfig.from_preset("paper", pool_size=9)
    RoClipDefense(cfg, plugin_manager=pm, options=options)
    assert seen == [(cfg, options)]


def test_roclip_make_matcher() -> None:
    calls = []

    class Oldest:
        @hookimpl
        def roclip_make_matcher(self, config):
            def matcher(image_features, pool):
                calls.append(len(pool))
                return torch.zeros(image_features.shape[0], dtype=torch.long)

            return matcher

    got: list = []
    defense = _defense(Oldest(), _Recorder(got))
    defense.start_epoch(0)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    defense.start_epoch(1)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    assert calls == [8]
    assert torch.equal(got[0].matched_indices, torch.zeros(8, dtype=torch.long))


class _Recorder:
    def __init__(self, sink: list) -> None:
        self.sink = sink

    @hookimpl
    def roclip_after_match(self, stats):
        self.sink.append(stats)


def test_roclip_should_match() -> None:
    class EveryOther:
        @hookimpl
        def roclip_should_match(self, unit):
            return unit % 2 == 1

    defense = _defense(EveryOther(), first_defended_epoch=100)
    assert [defense.start_epoch(e) for e in range(4)] == [False, True, False, True]


def test_roclip_should_match_default_answers_when_plugin_abstains() -> None:
    class Abstain:
        @hookimpl
        def roclip_should_match(self, unit):
            return None

    defense = _defense(Abstain(), first_defended_epoch=2)
    assert [defense.start_epoch(e) for e in range(4)] == [False, False, True, True]


def test_roclip_register_augmentations() -> None:
    def shout(config):
        return str.upper

    class Plugin:
        @hookimpl
        def roclip_register_augmentations(self, register):
            register("text", "shout", shout)
            register("text", "none", shout, replace=True)

    pm = get_plugin_manager()
    pm.register(Plugin())
    registry = collect_augmentations(pm)
    assert registry.names("text") == ["eda", "none", "shout"]
    assert registry.names("image") == ["none", "roclip", "roclip-light", "roclip-small"]
    assert registry.build("text", "shout", RoClipConfig.from_preset("paper"))("a cat") == "A CAT"
    assert registry.build("text", "none", RoClipConfig.from_preset("paper"))("a cat") == "A CAT"
    assert registry.build("image", "none", RoClipConfig.from_preset("paper"))(5) == 5
    with pytest.raises(ValueError, match="--roclip-text-aug: unknown text augmentation 'x'"):
        registry.build("text", "x", RoClipConfig.from_preset("paper"))


def test_duplicate_augmentation_name_needs_replace() -> None:
    class Plugin:
        @hookimpl
        def roclip_register_augmentations(self, register):
            register("image", "none", lambda config: None)

    pm = get_plugin_manager()
    pm.register(Plugin())
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        collect_augmentations(pm)


def test_roclip_epoch_start() -> None:
    seen = []

    class Plugin:
        @hookimpl
        def roclip_epoch_start(self, epoch, matching, defense):
            seen.append((epoch, matching, len(defense.pool)))

    defense = _defense(Plugin())
    defense.start_epoch(0)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    defense.start_epoch(1)
    assert seen == [(0, False, 0), (1, True, 8)]


def test_roclip_pool_updated() -> None:
    seen = []

    class Plugin:
        @hookimpl
        def roclip_pool_updated(self, pool, added, epoch, step):
            seen.append((len(pool), added, epoch, step))

    defense = _defense(Plugin())
    defense.start_epoch(0)
    img, txt = _features()
    defense.compute_loss(img, txt, torch.tensor(5.0))
    txt[0] = 0.0  # a zero caption row: the pool refuses it (a NaN one the loss refuses)
    with pytest.warns(RuntimeWarning, match="refused 1 caption"):
        defense.compute_loss(img, txt, torch.tensor(5.0))
    assert seen == [(8, 8, 0, 0), (15, 7, 0, 1)]


def test_roclip_after_match() -> None:
    got: list = []
    defense = _defense(_Recorder(got))
    defense.start_epoch(0)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    assert got == []  # plain epoch: nothing matched
    defense.start_epoch(1)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    assert len(got) == 1
    stats = got[0]
    assert (stats.epoch, stats.step, stats.pool_fill, stats.pool_size) == (1, 1, 8, 32)
    assert stats.margins.shape == (8,)
    assert -1.0 <= stats.own_similarity <= stats.matched_similarity + 2.0


def test_statistics_are_skipped_without_observers(monkeypatch) -> None:
    defense = _defense()
    computed = []
    original = defense.decider._stats
    monkeypatch.setattr(defense.decider, "_stats", lambda *a: computed.append(1) or original(*a))
    defense.start_epoch(0)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    defense.start_epoch(1)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    assert computed == []  # a matching step, but nobody listens


def test_observer_registered_after_construction_is_served() -> None:
    got: list = []
    defense = _defense()
    defense.pm.register(_Recorder(got))
    defense.start_epoch(0)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    defense.start_epoch(1)
    defense.compute_loss(*_features(), torch.tensor(5.0))
    assert len(got) == 1


def test_entry_point_plugins_load_unless_disabled(tmp_path: Path) -> None:
    """A plugin installed through the `roclip` entry-point group is found; the env var skips it."""
    dist = tmp_path / "roclip_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: roclip-demo-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text("[roclip]\ndemo = roclip_demo_plugin_mod\n")
    (tmp_path / "roclip_demo_plugin_mod.py").write_text(
        textwrap.dedent(
            """
            import roclip_plugin

            @roclip_plugin.hookimpl
            def roclip_should_match(unit):
                return True
            """
        )
    )
    code = (
        "import roclip_plugin as r;"
        "pm = r.get_plugin_manager();"
        "print(sorted(n for n, _ in pm.list_name_plugin()))"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    loaded = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "demo" in loaded.stdout
    off = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, AUTOLOAD_ENV: "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" not in off.stdout and "roclip.builtins" in off.stdout


def test_roclip_add_commands(capsys) -> None:
    from roclip_plugin.cli import main

    class Commands:
        @hookimpl
        def roclip_add_commands(self, subparsers):
            hello = subparsers.add_parser("hello", help="say hello")
            hello.add_argument("--name", default="world")
            hello.set_defaults(run=self.run)

        @staticmethod
        def run(args, console):
            if args.name == "nobody":  # a plugin's own check of a value argparse accepts
                raise ValueError("--name: nobody; give a name")
            console.print(f"hello {args.name}")
            return 7

    pm = get_plugin_manager()
    pm.register(Commands())
    assert main(["hello", "--name", "you"], pm=pm) == 7
    assert "hello you" in capsys.readouterr().out
    assert main(["hello", "--name", "nobody"], pm=pm) == 2
    assert "--name: nobody; give a name" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):  # an empty value: refused by the parser itself
        main(["hello", "--name", ""], pm=pm)
    with pytest.raises(SystemExit):
        main(["hello"])  # a manager without the plugin has no such command


def test_roclip_register_risk_scorers() -> None:
    from roclip_plugin.risk import CosineScorer, collect_scorers

    class Plugin:
        @hookimpl
        def roclip_register_risk_scorers(self, register):
            register("cos2", lambda config: CosineScorer())
            register("margin", lambda config: CosineScorer(), replace=True)

    pm = get_plugin_manager()
    pm.register(Plugin())
    factories = collect_scorers(pm)
    assert {"cos2", "cosine", "history", "density", "margin"} <= set(factories)
    assert isinstance(factories["margin"](RoClipConfig.from_preset("paper")), CosineScorer)

    class Clash:
        @hookimpl
        def roclip_register_risk_scorers(self, register):
            register("history", lambda config: CosineScorer())

    clash = get_plugin_manager()
    clash.register(Clash())
    with pytest.raises(ValueError, match="replace=True"):
        collect_scorers(clash)


def test_roclip_after_risk() -> None:
    seen = []

    class Plugin:
        @hookimpl
        def roclip_after_risk(self, stats):
            seen.append(stats)

    pm = get_plugin_manager()
    pm.register(Plugin())
    config = RoClipConfig.from_preset("robust", pool_size=16)
    defense = RoClipDefense(config, plugin_manager=pm, samples_per_epoch=64)
    img, txt = _features()
    for epoch in range(2):
        defense.start_epoch(epoch)
        defense.compute_loss(img, txt, torch.tensor(10.0), sample_ids=torch.arange(8))
    (stats,) = seen  # the first epoch only observes
    assert stats.epoch == 1 and stats.action == "drop" and int(stats.risky.sum()) == 1
    assert stats.ids.tolist() == list(range(8))
