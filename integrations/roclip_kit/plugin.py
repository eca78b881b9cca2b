"""The kit's ``roclip`` sub-commands, added through the ``roclip_add_commands`` hook.

Registered in the ``roclip`` entry-point group (pyproject.toml), so installing the package gives
``roclip demo``, ``roclip data``, ``roclip poison``, ``roclip eval`` and ``roclip scan`` while
the core never imports the kit. The kit needs the ``kit`` extra (Pillow, OpenCLIP,
scikit-learn, faiss); without it
the commands still appear and say how to install what is missing, and the core's own commands
(``roclip smoke``, ``roclip flags``) keep working.
"""

from __future__ import annotations

import argparse
from typing import Any

from roclip_plugin import hookimpl

COMMANDS = {
    "demo": "Poison captioned MNIST, train CLIP and RoCLIP with OpenCLIP, compare them.",
    "data": "Build a captioned image dataset (MNIST, Fashion-MNIST, digits) offline.",
    "poison": "Write a poisoned copy of a CSV dataset (targeted, backdoor) and its manifest.",
    "eval": "Score a checkpoint: clean accuracy, attack success, poison detection.",
    "scan": "Rank a dataset's pairs by how poisoned they look; report; write a filtered CSV.",
}


@hookimpl
def roclip_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo``, ``data``, ``poison``, ``eval`` and ``scan`` to the ``roclip`` command."""
    try:
        from roclip_kit.commands.data import add_data_command, add_poison_command
        from roclip_kit.commands.demo import add_demo_command
        from roclip_kit.commands.eval import add_eval_command
        from roclip_kit.commands.scan import add_scan_command
    except ImportError as err:  # an optional dependency of the kit is not installed
        _add_unavailable(subparsers, err)
        return
    add_demo_command(subparsers)
    add_data_command(subparsers)
    add_poison_command(subparsers)
    add_eval_command(subparsers)
    add_scan_command(subparsers)


def _add_unavailable(subparsers: argparse._SubParsersAction, err: ImportError) -> None:
    """Commands that explain the missing package instead of disappearing."""
    message = (
        f"the attack and evaluation kit needs {err.name or 'a package'} that is not installed "
        f'({err}); install the kit\'s extra: pip install "roclip-plugin[kit]"'
    )

    def unavailable(args: argparse.Namespace, console: Any) -> int:
        raise ValueError(message)

    for name, help_text in COMMANDS.items():
        # "+" as the option prefix: every word after the command, flags included, lands in
        # ``rest``, so the user sees the install hint instead of a usage error.
        parser = subparsers.add_parser(
            name, help=f"{help_text} (needs the kit extra)", prefix_chars="+", add_help=False
        )
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(run=unavailable)
