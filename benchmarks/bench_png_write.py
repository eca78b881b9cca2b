"""PNG write time of the kit's dataset builder (`roclip data`) on a full training split.

Renders 60,000 captioned images the way `roclip data` does (Fashion-MNIST when installed, else
MNIST, else scikit-learn's digits repeated), then times only the writing: the kit's own
``write_png`` on the builder's writer threads, into a temporary folder. Rendering is left out,
so the figure is the encoder and the file system, which is what the choice of encoder changes.

    python benchmarks/bench_png_write.py                  # 60,000 images of 32 px
    python benchmarks/bench_png_write.py --count 10000 --image-size 28 --compress-level 0
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from roclip_kit.data import captions, datasets


def source_images(count: int) -> tuple[str, np.ndarray]:
    """``count`` grayscale source images from the first dataset that is installed."""
    for name in ("fashion-mnist", "mnist", "digits"):
        try:
            images = datasets.load_source(name).train_images
        except ValueError:
            continue
        repeats = -(-count // len(images))
        return name, np.concatenate([images] * repeats)[:count]
    raise SystemExit("no source dataset is installed")


def rendered(count: int, image_size: int, seed: int) -> tuple[str, np.ndarray]:
    """RGB uint8 images as the builder renders them (attributes drawn as `roclip data` does)."""
    name, images = source_images(count)
    rng = np.random.default_rng(seed)
    attrs = captions.draw_attributes(count, rng)
    out = [
        datasets.render_batch(images, attrs, np.arange(b, min(b + 4096, count)), image_size)
        for b in range(0, count, 4096)
    ]
    return name, np.concatenate(out)


def time_writes(rgbs: np.ndarray, folder: Path) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) to write every image as the builder does.

    CPU time is the steadier figure on a shared machine, where waiting for a core inflates the
    wall time of a low-priority run several times over.
    """
    paths = [f"{folder}{os.sep}{i:06d}.png" for i in range(len(rgbs))]
    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(datasets.WRITER_THREADS) as pool:
        list(pool.map(datasets.write_png, paths, rgbs))
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60_000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compress-level", type=int, default=None, help="Pillow's level (default: the kit's)"
    )
    args = parser.parse_args()
    if args.compress_level is not None:
        datasets.PNG_COMPRESS_LEVEL = args.compress_level
    name, rgbs = rendered(args.count, args.image_size, args.seed)
    (best, cpu), size = (float("inf"), float("inf")), 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            best, cpu = min((best, cpu), time_writes(rgbs, Path(tmp)))
            size = sum(entry.stat().st_size for entry in os.scandir(tmp))
    print(
        f"{args.count} {name} images of {args.image_size} px, {datasets.WRITER_THREADS} writer "
        f"threads, compress level {datasets.PNG_COMPRESS_LEVEL}: best of {args.repeats} "
        f"{best:.2f} s wall ({args.count / best:,.0f} images/s), {cpu:.2f} s CPU, "
        f"{size / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
