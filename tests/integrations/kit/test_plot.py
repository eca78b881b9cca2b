from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from roclip_kit.plot import HEIGHT, MARGIN_LEFT, MARGIN_TOP, WIDTH, Chart, Series, draw_chart  # noqa: E402


def _pixels(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        return {rgb.getpixel((x, y)) for x in range(rgb.width) for y in range(rgb.height)}


def test_chart_draws_each_series_in_its_colour(tmp_path: Path) -> None:
    red, blue = (200, 10, 10), (10, 10, 200)
    chart = Chart(
        "t",
        [Series("a", {1: 0.0, 2: 1.0}, colour=red), Series("b", {1: 0.5, 2: 0.5}, True, blue)],
        shaded_epochs=[2],
    )
    path = draw_chart(chart, tmp_path / "c.png")
    with Image.open(path) as image:
        assert image.size == (WIDTH, HEIGHT)
        # series "a" rises from 0% at epoch 1 (bottom left of the plot) to 100% at epoch 2
        assert image.convert("RGB").getpixel((MARGIN_LEFT, MARGIN_TOP)) != red
    colours = _pixels(path)
    assert red in colours and blue in colours


def test_chart_without_values_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to plot"):
        draw_chart(Chart("t", [Series("a", {})]), tmp_path / "c.png")
