"""A line chart of attack success per epoch, drawn with Pillow (no plotting library needed).

The demo's figure: one line per (run, metric), epochs on the x axis, 0 to 100% on the y axis,
and the epochs in which RoCLIP matched shaded, so a reader sees when the attack took hold and
whether matching broke it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

WIDTH, HEIGHT = 720, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 190, 40, 50
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
SHADE = (235, 235, 245)
GRID = (220, 220, 220)
INK = (40, 40, 40)


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
    x_label: str = "epoch"
    y_label: str = "attack success"


def _epochs(chart: Chart) -> tuple[int, int]:
    epochs = [e for s in chart.series for e in s.values] + list(chart.shaded_epochs)
    if not epochs:
        raise ValueError("nothing to plot: no series has a value")
    return min(epochs), max(epochs)


def _segments(
    points: list[tuple[float, float]], dashed: bool
) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Line segments between consecutive points; dashed lines are cut into 8-pixel pieces."""
    pieces = []
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if not dashed:
            pieces.append(((x0, y0), (x1, y1)))
            continue
        length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1e-9)
        steps = max(int(length // 8), 1)
        for i in range(0, steps, 2):
            a, b = i / steps, min((i + 1) / steps, 1.0)
            pieces.append(
                ((x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0)))
            )
    return pieces


def draw_chart(chart: Chart, path: Path | str) -> Path:
    """Draw ``chart`` into a PNG at ``path`` and return the path."""
    from PIL import Image, ImageDraw

    first, last = _epochs(chart)
    span = max(last - first, 1)
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x_of(epoch: float) -> float:
        return MARGIN_LEFT + (epoch - first) / span * plot_w

    def y_of(value: float) -> float:
        return MARGIN_TOP + (1.0 - min(max(value, 0.0), 1.0)) * plot_h

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    half = plot_w / span / 2
    for epoch in chart.shaded_epochs:  # clipped to the plot area
        left = max(x_of(epoch) - half, MARGIN_LEFT)
        right = min(x_of(epoch) + half, MARGIN_LEFT + plot_w)
        draw.rectangle((left, MARGIN_TOP, right, MARGIN_TOP + plot_h), fill=SHADE)
    for tick in range(0, 101, 20):
        y = y_of(tick / 100)
        draw.line((MARGIN_LEFT, y, MARGIN_LEFT + plot_w, y), fill=GRID)
        draw.text((MARGIN_LEFT - 8, y), f"{tick}%", fill=INK, anchor="rm")
    step = max(1, span // 10)
    for epoch in range(first, last + 1, step):
        draw.text((x_of(epoch), MARGIN_TOP + plot_h + 8), str(epoch), fill=INK, anchor="mt")
    draw.rectangle(
        (MARGIN_LEFT, MARGIN_TOP, MARGIN_LEFT + plot_w, MARGIN_TOP + plot_h), outline=INK
    )
    draw.text((WIDTH / 2 - MARGIN_RIGHT / 2, 14), chart.title, fill=INK, anchor="mt")
    draw.text((MARGIN_LEFT + plot_w / 2, HEIGHT - 16), chart.x_label, fill=INK, anchor="mb")
    draw.text((8, MARGIN_TOP - 22), chart.y_label, fill=INK)
    _draw_series(draw, chart, x_of, y_of)
    _draw_legend(draw, chart, MARGIN_LEFT + plot_w + 14)
    path = Path(path)
    image.save(path)
    return path


def _colour(chart: Chart, index: int) -> tuple[int, int, int]:
    series = chart.series[index]
    return series.colour or PALETTE[index % len(PALETTE)]


def _draw_series(draw: object, chart: Chart, x_of: object, y_of: object) -> None:
    for index, series in enumerate(chart.series):
        colour = _colour(chart, index)
        points = [(x_of(e), y_of(v)) for e, v in sorted(series.values.items())]  # type: ignore[operator]
        for a, b in _segments(points, series.dashed):
            draw.line((a, b), fill=colour, width=3)  # type: ignore[attr-defined]
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)  # type: ignore[attr-defined]


def _draw_legend(draw: object, chart: Chart, left: float) -> None:
    top = MARGIN_TOP
    for index, series in enumerate(chart.series):
        colour = _colour(chart, index)
        y = top + 20 * index + 6
        for a, b in _segments([(left, y), (left + 26, y)], series.dashed):
            draw.line((a, b), fill=colour, width=3)  # type: ignore[attr-defined]
        draw.text((left + 32, y), series.label, fill=INK, anchor="lm")  # type: ignore[attr-defined]
    if chart.shaded_epochs:
        y = top + 20 * len(chart.series) + 6
        draw.rectangle((left, y - 6, left + 26, y + 6), fill=SHADE)  # type: ignore[attr-defined]
        draw.text((left + 32, y), "RoCLIP matching", fill=INK, anchor="lm")  # type: ignore[attr-defined]
