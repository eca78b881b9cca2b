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
from typing import Any

import pluggy
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from roclip_plugin import __version__
from roclip_plugin.checks import POOL_SHARE_LIMIT
from roclip_plugin.config import (
    PRESETS,
    RoClipConfig,
    add_argparse_args,
    config_from_namespace,
    field_names,
    flag_name,
)
from roclip_plugin.io import atomic_write_text, check_output_file, detach_stdout
from roclip_plugin.plugins import get_plugin_manager
from roclip_plugin.validation import check_parsed, path_arg

SMOKE_TRAIN = 20000  # roclip smoke's default --train
DEMO_POOL_SHARE = POOL_SHARE_LIMIT  # the smoke's pool: 10% of its pairs, the warning's limit
DESCRIPTION = (
    "RoCLIP for CLIP training: `roclip smoke` (a synthetic check of the mechanism, core only), "
    "`roclip flags` (every --roclip-* flag), and the commands plugins add (the attack and "
    "evaluation kit: demo, data, poison, eval)."
)


def smoke_defaults(pairs: int) -> dict[str, Any]:
    """The RoCLIP defaults of `roclip smoke` for a run of ``pairs`` training pairs an epoch.

    The pool holds :data:`DEMO_POOL_SHARE` of them (the size warning's limit; a larger pool
    hands images their own captions back). One source for the help and the run.
    """
    return {"pool_size": max(1, int(DEMO_POOL_SHARE * pairs))}


def _smoke_default_text() -> dict[str, str]:
    """What the smoke's help says of the defaults that depend on ``--train``."""
    from roclip_plugin.smoke import DemoSettings

    base = DemoSettings(train=SMOKE_TRAIN)
    pool = smoke_defaults(base.pairs)["pool_size"]
    share = f"{DEMO_POOL_SHARE:.0%} of the training pairs"
    return {"pool_size": f"{share}, {pool} for the default --train {SMOKE_TRAIN}"}


def build_parser(pm: pluggy.PluginManager | None = None) -> argparse.ArgumentParser:
    """Parser with the core's sub-commands and those plugins add."""
    pm = get_plugin_manager() if pm is None else pm
    parser = argparse.ArgumentParser(prog="roclip", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"roclip-plugin {__version__}")
    parser.set_defaults(plugin_manager=pm)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    smoke = sub.add_parser(
        "smoke",
        help="Seconds-long synthetic smoke run: CLIP vs RoCLIP on a poisoned synthetic world.",
        description="A short CPU run (about 10 CPU-seconds at the default size, on one "
        "thread) that shows the defense's mechanism on synthetic feature vectors (no images, "
        "no OpenCLIP). RoCLIP options below apply to the RoCLIP run. Its "
        "'images' are vectors and its captions token bags, so --roclip-image-aug and "
        "--roclip-text-aug select feature noise and word dropout as stand-ins (none turns one "
        "off); the other augmentation flags are checked but change nothing here. For real "
        "images, see `roclip demo`.",
    )
    smoke.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    smoke.add_argument(
        "--seed", type=int, default=0, help="data and training seed (default: %(default)s)"
    )
    smoke.add_argument(
        "--epochs", type=int, default=10, help="training epochs (default: %(default)s)"
    )
    smoke.add_argument(
        "--train", type=int, default=SMOKE_TRAIN, help="clean pairs (default: %(default)s)"
    )
    smoke.add_argument("--json", type=path_arg, help="also write the results to this JSON file")
    group = smoke.add_argument_group("RoCLIP options")
    add_argparse_args(group, default_text=_smoke_default_text())
    pm.hook.roclip_add_options(parser=group)
    smoke.set_defaults(run=_smoke)
    flags = sub.add_parser("flags", help="List every --roclip-* flag with its default.")
    flags.add_argument(
        "--preset",
        default="default",
        choices=PRESETS,
        help="whose values to list: default (the robust preset), paper, reference (the "
        "authors' semantics), safeclip or robust (default: %(default)s)",
    )
    flags.set_defaults(run=_flags)
    pm.hook.roclip_add_commands(subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None, pm: pluggy.PluginManager | None = None) -> int:
    """Entry point of the ``roclip`` console script.

    Bad input exits 2 with one line that names the flag and the fix, never a traceback: a
    command raises ``ValueError`` for it (``OSError`` for a file that could not be read or
    written); argparse's own errors exit 2 too.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
        pm: the plugin manager (default: a new one, with entry-point plugins).
    """
    try:
        parser = build_parser(pm)
        args = parser.parse_args(argv)
        check_parsed(parser, args)
        console = Console()
        try:
            return int(args.run(args, console))
        except ValueError as err:
            return _refuse(console, str(err))
        except BrokenPipeError:
            raise
        except OSError as err:  # a file the checks could not foresee (disk full, permissions)
            return _refuse(console, _os_error_text(err))
    except BrokenPipeError:  # roclip ... | head: the reader left; stop quietly
        detach_stdout()
        return 141


def _refuse(console: Console, message: str) -> int:
    # escaped: messages quote flags and commands such as pip install "x[kit]"; soft wrap
    # keeps a quoted command on one line for copying
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return 2


def _os_error_text(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}; check the path and its permissions"


def _flags(args: argparse.Namespace, console: Console) -> int:
    preset = args.preset
    config = RoClipConfig.from_preset(preset)
    table = Table(title=f"RoCLIP flags ({preset} preset)")
    flags = [flag_name(name) for name in field_names()]
    # the flags whole (a cut flag name cannot be copied); the meaning column wraps instead
    table.add_column("flag", no_wrap=True, min_width=max(map(len, flags)))
    table.add_column("value")
    table.add_column("meaning")
    meta = {f.name: f.metadata["help"] for f in fields(RoClipConfig)}
    for name in field_names():
        table.add_row(flag_name(name), str(getattr(config, name)), meta[name])
    console.print(table)
    return 0


def _smoke(args: argparse.Namespace, console: Console) -> int:
    from roclip_plugin.augment import check_policy_names
    from roclip_plugin.matching import check_matcher_settings
    from roclip_plugin.smoke import DemoSettings, run_demo

    json_path = check_output_file(args.json, "--json")
    settings = DemoSettings(
        train=args.train, epochs=args.epochs, seed=args.seed, device=args.device
    )  # checks every size, the seed and the device
    config = config_from_namespace(args, smoke_defaults(settings.pairs))
    check_matcher_settings(config)
    check_policy_names(config, _plugin_manager(args))
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
    for col in ("run", "zero-shot", "target ASR", "poison P@k", "defended", "train s"):
        table.add_column(col, justify="right" if col != "run" else "left", no_wrap=True)
    for r in results:
        det = "-" if r.detection_precision is None else f"{100 * r.detection_precision:.1f}%"
        table.add_row(
            r.name,
            f"{100 * r.zero_shot:.1f}%",
            f"{100 * r.targeted_asr:.1f}%",
            det,
            ",".join(map(str, r.defended_epochs)) or "-",
            f"{r.seconds:.1f}",
        )
    console.print(table)
    if json_path is not None:
        data = {
            "settings": asdict(settings),
            "config": config.to_dict(),
            "results": [asdict(r) for r in results],
        }
        atomic_write_text(json_path, json.dumps(data, indent=2))
    return 0


def _plugin_manager(args: argparse.Namespace) -> pluggy.PluginManager:
    """The plugin manager the command was built with (for augmentation names)."""
    return getattr(args, "plugin_manager", None) or get_plugin_manager()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
