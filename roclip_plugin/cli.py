"""The ``roclip`` command: ``roclip smoke``, ``roclip flags``, and the plugins' commands.

The core's own sub-commands need nothing beyond the core. Plugins add theirs through the
``roclip_add_commands`` hook: the attack and evaluation kit (``roclip_kit``) adds ``demo``,
``data``, ``poison`` and ``eval`` that way, so the core never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import pluggy
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from roclip_plugin import __version__
from roclip_plugin.checks import POOL_SHARE_LIMIT
from roclip_plugin.config import (
    RoClipConfig,
    add_argparse_args,
    config_from_namespace,
    field_names,
    flag_name,
)
from roclip_plugin.plugins import get_plugin_manager

DEMO_POOL_SHARE = POOL_SHARE_LIMIT  # the smoke's pool: 10% of its pairs, the warning's limit


def build_parser(pm: pluggy.PluginManager | None = None) -> argparse.ArgumentParser:
    """Parser with the core's sub-commands and those plugins add."""
    pm = get_plugin_manager() if pm is None else pm
    parser = argparse.ArgumentParser(prog="roclip", description=__doc__)
    parser.add_argument("--version", action="version", version=f"roclip-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    smoke = sub.add_parser(
        "smoke",
        help="Seconds-long synthetic smoke run: CLIP vs RoCLIP on a poisoned synthetic world.",
        description="A short CPU run (seconds) that shows the defense's mechanism on synthetic "
        "feature vectors (no images, no OpenCLIP). RoCLIP options below apply to the RoCLIP run "
        f"(pool size defaults to {DEMO_POOL_SHARE:.0%} of the training pairs here, 2,024 for the "
        "default 20,000 + 240). For real images, see `roclip demo`.",
    )
    smoke.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    smoke.add_argument("--seed", type=int, default=0, help="data and training seed (default: 0)")
    smoke.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    smoke.add_argument("--train", type=int, default=20000, help="clean pairs (default: 20000)")
    smoke.add_argument("--json", type=Path, help="also write the results to this JSON file")
    group = smoke.add_argument_group("RoCLIP options")
    add_argparse_args(group)
    pm.hook.roclip_add_options(parser=group)
    smoke.set_defaults(run=_smoke)
    flags = sub.add_parser("flags", help="List every --roclip-* flag with its default.")
    flags.add_argument("--preset", default="default", choices=("default", "reference"))
    flags.set_defaults(run=_flags)
    pm.hook.roclip_add_commands(subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None, pm: pluggy.PluginManager | None = None) -> int:
    """Entry point of the ``roclip`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
        pm: the plugin manager (default: a new one, with entry-point plugins).
    """
    args = build_parser(pm).parse_args(argv)
    console = Console()
    try:
        return int(args.run(args, console))
    except ValueError as err:
        # escaped: messages quote flags and commands such as pip install "x[kit]"; soft wrap
        # keeps a quoted command on one line for copying
        console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        return 2


def _flags(args: argparse.Namespace, console: Console) -> int:
    preset = args.preset
    config = RoClipConfig.from_preset(preset)
    table = Table(title=f"RoCLIP flags ({preset} preset)")
    table.add_column("flag")
    table.add_column("value")
    table.add_column("meaning")
    meta = {f.name: f.metadata["help"] for f in fields(RoClipConfig)}
    for name in field_names():
        table.add_row(flag_name(name), str(getattr(config, name)), meta[name])
    console.print(table)
    return 0


def _smoke(args: argparse.Namespace, console: Console) -> int:
    from roclip_plugin.demo import DemoSettings, run_demo

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is visible; use --device cpu")
    settings = DemoSettings(
        train=args.train, epochs=args.epochs, seed=args.seed, device=args.device
    )
    if not hasattr(args, "roclip_pool_size"):
        args.roclip_pool_size = max(1, int(DEMO_POOL_SHARE * settings.pairs))
    config = config_from_namespace(args)
    console.print(
        f"[bold]roclip smoke[/bold]: {settings.train} synthetic pairs, {settings.targets} targets "
        f"x {settings.poison_captions} poison captions, {settings.epochs} epochs on "
        f"{settings.device}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        results = run_demo(settings, config)
    shown: set[str] = set()
    for w in caught:  # RoCLIP's warnings in the console; anything else as Python shows it
        if w.category is not RuntimeWarning:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif str(w.message) not in shown:
            shown.add(str(w.message))
            console.print(f"[yellow]warning:[/yellow] {escape(str(w.message))}", soft_wrap=True)
    table = Table(title="Synthetic targeted poisoning (a smoke demonstration, not real images)")
    for col in ("run", "zero-shot", "target ASR", "poison P@k", "matching", "train s"):
        table.add_column(col, justify="right" if col != "run" else "left", no_wrap=True)
    for r in results:
        det = "-" if r.detection_precision is None else f"{100 * r.detection_precision:.1f}%"
        table.add_row(
            r.name,
            f"{100 * r.zero_shot:.1f}%",
            f"{100 * r.targeted_asr:.1f}%",
            det,
            ",".join(map(str, r.matching_epochs)) or "-",
            f"{r.seconds:.1f}",
        )
    console.print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": asdict(settings),
                    "config": config.to_dict(),
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
