"""Rich progress bars and per-epoch tables of the training-loop helper."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from roclip_torch.summary import EpochSummary

COLUMNS = ("epoch", "loss", "matching", "pool", "matched sim", "own sim", "suspicious", "lr")


def make_progress(console: Console | None, *, disable: bool) -> Progress:
    """Progress bars for the run (epochs) and the current epoch (steps, running loss)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def _number(value: float, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def matching_label(summary: EpochSummary) -> str:
    """``yes`` / ``no``, or ``k/n steps`` when the schedule switched inside the epoch."""
    if summary.matching_steps == 0:
        return "no"
    if summary.matching_steps >= summary.steps:
        return "yes"
    return f"{summary.matching_steps}/{summary.steps} steps"


def summary_row(summary: EpochSummary) -> list[str]:
    """One table row; the order of :data:`COLUMNS`."""
    return [
        str(summary.epoch),
        _number(summary.loss),
        matching_label(summary),
        f"{summary.pool_fill}/{summary.pool_size}",
        _number(summary.matched_similarity),
        _number(summary.own_similarity),
        str(summary.suspicious) if summary.matching_steps else "-",
        f"{summary.lr:.3g}",
    ]


def summary_table(summaries: Sequence[EpochSummary], title: str) -> Table:
    """A table with one row per epoch summary."""
    table = Table(title=title, title_justify="left")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name == "matching" else "right")
    for summary in summaries:
        table.add_row(*summary_row(summary))
    return table
