"""The kit's ``roclip`` sub-commands, added through the ``roclip_add_commands`` hook.

Registered in the ``roclip`` entry-point group (pyproject.toml), so installing the package gives
``roclip demo``, ``roclip data``, ``roclip poison`` and ``roclip eval`` while the core never
imports the kit. The command modules are imported here, when the parser is built; their heavy
dependencies (OpenCLIP, scikit-learn) are imported only when a command runs.
"""

from __future__ import annotations

import argparse

from roclip_plugin import hookimpl


@hookimpl
def roclip_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo``, ``data``, ``poison`` and ``eval`` to the ``roclip`` command."""
    from roclip_kit.commands_data import add_data_command, add_poison_command
    from roclip_kit.commands_demo import add_demo_command
    from roclip_kit.commands_eval import add_eval_command

    add_demo_command(subparsers)
    add_data_command(subparsers)
    add_poison_command(subparsers)
    add_eval_command(subparsers)
