from __future__ import annotations

import sys
from pathlib import Path

import pytest
from roclip_kit.demo.plot import (
    DPI,
    SHADE_LABEL,
    SIZE_INCHES,
    Chart,
    PlotUnavailable,
    Series,
    build_figure,
    draw_chart,
    matplotlib_available,
)

RED, BLUE = (200, 10, 10), (10, 10, 200)


def _chart() -> Chart:
    return Chart(
        "t",
        [Series("a", {1: 0.0, 2: 1.0}, colour=RED), Series("b", {1: 0.5, 3: 1.5}, True, BLUE)],
        shaded_epochs=[2],
    )


def _hide_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails


def test_figure_holds_every_series_with_its_values_style_and_colour() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgb

    axes = build_figure(_chart()).axes[0]
    a, b = axes.get_lines()
    assert (a.get_label(), list(a.get_xdata()), list(a.get_ydata())) == ("a", [1, 2], [0.0, 1.0])
    assert list(b.get_ydata()) == [0.5, 1.0]  # clipped to 100%
    assert (a.get_linestyle(), b.get_linestyle()) == ("-", "--")
    assert to_rgb(a.get_color()) == pytest.approx(tuple(c / 255 for c in RED))
    low, high = axes.get_ylim()
    assert -0.05 < low < 0.0 and 1.0 < high < 1.05  # 0% and 100% inside, lines there whole
    assert axes.yaxis.get_major_formatter()(0.4, 0) == "40%"
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == [SHADE_LABEL, "a", "b"]
    chart = _chart()
    chart.shade_label = "RoCLIP defended"
    legend = [t.get_text() for t in build_figure(chart).axes[0].get_legend().get_texts()]
    assert legend == ["RoCLIP defended", "a", "b"]


def test_each_matching_epoch_is_shaded_one_epoch_wide() -> None:
    pytest.importorskip("matplotlib")
    chart = _chart()
    chart.shaded_epochs = [2, 3]
    patches = build_figure(chart).axes[0].patches
    # x of each span's corners, in data units (axvspan draws in data x, axes y)
    corners = [p.get_patch_transform().transform(p.get_path().vertices)[:, 0] for p in patches]
    spans = [sorted({round(float(x), 6) for x in xs}) for xs in corners]
    assert spans == [[1.5, 2.5], [2.5, 3.5]]


def test_chart_draws_a_png_in_the_series_colours(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    path = draw_chart(_chart(), tmp_path / "c.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(SIZE_INCHES[0] * DPI), round(SIZE_INCHES[1] * DPI))
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert RED in colours and BLUE in colours


def test_chart_without_values_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to plot"):
        draw_chart(Chart("t", [Series("a", {})]), tmp_path / "c.png")


def test_without_matplotlib_the_error_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_matplotlib(monkeypatch)
    assert not matplotlib_available()
    with pytest.raises(PlotUnavailable, match="pip install matplotlib") as caught:
        draw_chart(_chart(), tmp_path / "c.png")
    assert isinstance(caught.value, ImportError)
    assert not (tmp_path / "c.png").exists()
