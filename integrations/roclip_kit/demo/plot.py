"""The demo's line chart, drawn with matplotlib: attack success per epoch, matching shaded.

One line per (run, metric), epochs on the x axis, 0 to 100% on the y axis, and the epochs in
which RoCLIP matched shaded, so a reader sees when the attack took hold and whether matching
broke it. matplotlib is what users read and restyle, so the chart is an ordinary matplotlib
``Figure`` (:func:`build_figure`); it renders through the Agg canvas directly, never through
``pyplot``, so no display, global backend or open-figure registry is involved.

matplotlib is an optional dependency of the ``kit`` extra: without it :func:`draw_chart`
raises :class:`PlotUnavailable`, whose message says how to install it, and the demo goes on
without its picture.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SIZE_INCHES, DPI = (7.2, 4.2), 100
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
SHADE = (235, 235, 245)
SHADE_LABEL = "RoCLIP matching"
Y_PAD = 0.02  # fraction of the 0-100% axis left above and below
INSTALL_HINT = "pip install matplotlib"  # also in the kit extra; no brackets: rich reads markup


class PlotUnavailable(ImportError):
    """matplotlib is not installed: the chart cannot be drawn; the message says how to fix it."""


@dataclass
class Series:
    """One line: a label, its values by epoch (fractions in [0, 1]) and its dash style."""

    label: str
    values: Mapping[int, float]
    dashed: bool = False
    colour: tuple[int, int, int] | None = None


@dataclass
class Chart:
    """What to draw: the series, the epochs to shade and the titles."""

    title: str
    series: list[Series]
    shaded_epochs: Sequence[int] = field(default_factory=tuple)
    shade_label: str = SHADE_LABEL
    x_label: str = "epoch"
    y_label: str = "attack success"


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules: treated as missing
        return False


def _epochs(chart: Chart) -> tuple[int, int]:
    epochs = [e for s in chart.series for e in s.values] + list(chart.shaded_epochs)
    if not epochs:
        raise ValueError("nothing to plot: no series has a value")
    return min(epochs), max(epochs)


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    """Matplotlib's colours are fractions; the kit's are 0-255 like Pillow's."""
    r, g, b = colour
    return (r / 255, g / 255, b / 255)


def _colour(chart: Chart, index: int) -> tuple[int, int, int]:
    series = chart.series[index]
    return series.colour or PALETTE[index % len(PALETTE)]


def _import_figure() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotUnavailable(f"the demo's plot needs matplotlib: {INSTALL_HINT}") from err
    return Figure


def build_figure(chart: Chart) -> Figure:
    """The chart as a matplotlib ``Figure``, for saving or restyling.

    Raises:
        ValueError: no series has a value and nothing is shaded.
        PlotUnavailable: matplotlib is not installed.
    """
    first, last = _epochs(chart)
    figure = _import_figure()(figsize=SIZE_INCHES, dpi=DPI)
    axes = figure.add_subplot()
    for epoch in chart.shaded_epochs:  # a whole epoch wide, like a bar
        label = chart.shade_label if epoch == chart.shaded_epochs[0] else None
        axes.axvspan(epoch - 0.5, epoch + 0.5, color=_rgb(SHADE), zorder=0, label=label)
    for index, series in enumerate(chart.series):
        epochs = sorted(series.values)
        axes.plot(
            epochs,
            [min(max(series.values[e], 0.0), 1.0) for e in epochs],
            linestyle="--" if series.dashed else "-",
            marker="o",
            markersize=4,
            linewidth=2,
            color=_rgb(_colour(chart, index)),
            label=series.label,
        )
    _style_axes(axes, chart, first, last)
    figure.tight_layout()
    return figure


def _style_axes(axes: Axes, chart: Chart, first: int, last: int) -> None:
    from matplotlib.ticker import MaxNLocator, MultipleLocator, PercentFormatter

    margin = 0.5 if chart.shaded_epochs else 0.25
    axes.set_xlim(first - margin, max(last, first + 1) + margin)
    axes.set_ylim(-Y_PAD, 1.0 + Y_PAD)  # a line at 0% or 100% shows whole
    axes.yaxis.set_major_locator(MultipleLocator(0.2))
    axes.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes.grid(axis="y", color="0.86")
    axes.set_title(chart.title)
    axes.set_xlabel(chart.x_label)
    axes.set_ylabel(chart.y_label)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize="small")


def draw_chart(chart: Chart, path: Path | str) -> Path:
    """Draw ``chart`` into a PNG at ``path`` (through the Agg canvas) and return the path.

    Raises:
        ValueError: nothing to plot.
        PlotUnavailable: matplotlib is not installed (the message says how to get it).
    """
    figure = build_figure(chart)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # Agg, whatever backend matplotlib would pick for a screen
    path = Path(path)
    figure.savefig(path, format="png", dpi=DPI)
    return path
