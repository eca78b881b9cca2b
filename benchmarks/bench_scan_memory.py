"""Scan memory benchmark: the peak memory of scoring, all rows at once against blocks read in place.

Writes random unit embeddings of ``--pairs`` pairs (captions repeated as templates are) into
an :class:`~roclip_plugin.scan.EmbeddingStore`, then scores them twice, each in a fresh
process so that one's peak does not hide the other's:

- ``whole``: ``store.load()`` into memory, ``ScanSettings(block=None)``: every detector's
  neighbour tables for all rows at once (the scan before bounded memory);
- ``blocked``: ``store.load(mapped=True)`` (memory maps), ``block`` rows at a time, the
  targeted score's tables spilled to the store's folder (what ``roclip scan`` does).

Printed per mode: the peak of the process's anonymous memory above its level before scoring
(``RssAnon`` of ``/proc/self/status``, sampled every 5 ms: numpy's arrays and faiss's indexes;
pages of a memory-mapped file are not anonymous, the kernel drops them when memory is short),
that peak per pair, numpy's own peak (``tracemalloc``, which does not see faiss's C++
allocations) and the wall-clock seconds. Nothing is asserted.

    python benchmarks/bench_scan_memory.py --pairs 120000 --dim 64 --threads 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

from roclip_plugin.scan import EmbeddingStore, ScanSettings, score_embeddings

IDENTITY = {"benchmark": "bench_scan_memory"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=120_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=ScanSettings().block)
    parser.add_argument("--threads", type=int, default=1, help="faiss's threads (0: default)")
    parser.add_argument("--mode", choices=("whole", "blocked"), help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_store(folder: Path, pairs: int, dim: int) -> None:
    """Random unit embeddings, a caption in 50 repeated 20 times, in 4,096-pair chunks."""
    rng = np.random.default_rng(0)
    store = EmbeddingStore.create(folder, pairs, 4096, IDENTITY)
    for chunk in store.missing():
        rows = store.rows(chunk)
        images = rng.normal(size=(len(rows), dim)).astype(np.float32)
        captions = rng.normal(size=(len(rows), dim)).astype(np.float32)
        captions[::50] = captions[0]
        images /= np.linalg.norm(images, axis=1, keepdims=True)
        captions /= np.linalg.norm(captions, axis=1, keepdims=True)
        store.write(chunk, images, captions)


def anonymous_kib() -> int:
    """The process's resident anonymous memory in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status: Linux only")


class PeakSampler:
    """The highest ``anonymous_kib`` seen by a thread sampling every 5 ms."""

    def __init__(self) -> None:
        self.peak = anonymous_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, anonymous_kib())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_kib())


def measure(args: argparse.Namespace) -> None:
    """Score the store once in this process and print one line of figures."""
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    store = EmbeddingStore.resume(args.store, args.pairs, 4096, IDENTITY)
    block = None if args.mode == "whole" else args.block
    settings = ScanSettings(block=block)
    before = anonymous_kib()
    tracemalloc.start()
    started = time.perf_counter()
    with PeakSampler() as sampler:
        images, captions = store.load(mapped=args.mode == "blocked")
        scratch = store.folder if args.mode == "blocked" else None
        score_embeddings(images, captions, settings, scratch=scratch)
    seconds = time.perf_counter() - started
    numpy_peak = tracemalloc.get_traced_memory()[1]
    peak = (sampler.peak - before) * 1024
    print(
        f"| {args.mode} | {block or 'all'} | {peak / 2**20:.1f} MiB | {peak / args.pairs:.0f} B "
        f"| {numpy_peak / 2**20:.1f} MiB | {seconds:.1f} s |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode:
        measure(args)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "embeddings"
        write_store(store, args.pairs, args.dim)
        print(f"{args.pairs} pairs, dimension {args.dim}, {args.threads or 'default'} thread(s)")
        print("| mode | block | anonymous peak | a pair | numpy peak | seconds |")
        print("|---|---|---|---|---|---|")
        for mode in ("whole", "blocked"):
            command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--mode", mode]
            subprocess.run([*command, "--store", str(store)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
