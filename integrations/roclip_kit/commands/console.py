"""Terminal output the kit's commands share: progress bars and percentages."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bars(console: Console, *, elapsed: bool = False) -> Progress:
    """Transient bars (description, bar, n/total, time left) that vanish when the work is done.

    ``elapsed`` also shows the time spent, for long steps (the demo's training runs) where the
    estimate of the time left only settles after the first units.
    """
    clocks = (
        (TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        if elapsed
        else (TimeRemainingColumn(),)
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *clocks)
    return Progress(*columns, console=console, transient=True)


def percent(value: float | None) -> str:
    """A fraction as ``97.1%``; ``-`` where there is no figure."""
    return "-" if value is None else f"{100 * value:.1f}%"


def captions_text(counts: int | list[int]) -> str:
    """Captions per target as shown: ``100``, or ``10/50`` for groups of different strengths."""
    return "/".join(map(str, counts)) if isinstance(counts, list) else str(counts)
