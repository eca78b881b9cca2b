"""Scan a dataset for poisoned pairs with a trained model (``roclip scan``, docs/scan.md).

The kit's half of the scan: read the dataset's pairs (OpenCLIP's CSV, the kit's data
directory whose ``train.csv`` it is, or WebDataset shards, :mod:`roclip_kit.data.shards`), embed
each pair once with a checkpoint, chunk by chunk into a resumable store
(:class:`roclip_plugin.scan.EmbeddingStore`), score every pair with the core's detectors
(:func:`roclip_plugin.scan.score_embeddings`) and write what a user acts on: the ranked pairs,
a report (AUROC and precision@k against a poison manifest, or score histograms without one),
a copy of the CSV without the top-ranked rows that OpenCLIP can train on directly, and the
keys (or rows) kept, one a line. Models load as ``roclip eval`` loads them
(:mod:`roclip_kit.train.models`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roclip_kit.evaluate.features import Advance, encode_images, encode_texts
from roclip_kit.files import (
    CAPTION_KEY,
    CSV_SEPARATOR,
    IMAGE_KEY,
    TRAIN_CSV,
    read_manifest,
    read_rows,
    resolve_image,
)
from roclip_kit.train.loaded import LoadedModel
from roclip_plugin.io import atomic_write_text, require_file
from roclip_plugin.scan import (
    DETECTORS,
    EmbeddingStore,
    ScanSettings,
    auroc,
    precision_at_k,
    score_embeddings,
    top_rows,
)

KEY_COLUMN = "__key__"  # a WebDataset sample's key, when the CSV lists shards' samples
EMBEDDINGS_DIR = "embeddings"
SCORES_CSV = "scores.csv"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
HISTOGRAM_PNG = "histograms.png"
FILTERED_CSV = "train_filtered.csv"
KEPT_KEYS = "kept_keys.txt"
ATTACKS = ("backdoor", "targeted")
DEFAULT_CHUNK_SIZE = 4096


@dataclass(frozen=True)
class Pairs:
    """The image-caption pairs of one CSV (by data row: the header is not a row) or of shards.

    For shards, ``csv`` is None, ``shards`` the expanded shard list, ``keys`` every sample's
    ``__key__`` and ``filepaths`` each sample's shard (what a message names); the images are
    streamed from the shards while embedding.
    """

    csv: Path | None
    filepaths: list[str]
    captions: list[str]
    keys: list[str] | None = None  # the __key__ column, when there is one
    shards: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def source(self) -> str:
        """What was scanned, as the report names it: the CSV, or the shards' first and count."""
        if self.csv is not None:
            return str(self.csv)
        return f"{self.shards[0]} and {len(self.shards) - 1} more shard(s)"

    def where(self, row: int) -> str:
        """How a message names a row: its data row of the CSV, or its key and shard."""
        if self.csv is None and self.keys is not None:
            return f"sample {self.keys[row]} of {self.filepaths[row]}"
        return f"data row {row} of {self.csv}"

    def key_of(self, row: int) -> str:
        """The row's ``__key__``, or its row number where the data has no keys."""
        return self.keys[row] if self.keys is not None else str(row)


def read_shard_pairs(spec: str) -> Pairs:
    """The samples of WebDataset shards (``'/data/{00000..00009}.tar'``), keyed by ``__key__``."""
    from roclip_kit.data.shards import keys_and_captions, shard_urls

    urls = shard_urls(spec)
    keys, captions, where = keys_and_captions(urls)
    return Pairs(None, where, captions, keys, tuple(urls))


def dataset_csv(dataset: Path | None, csv_path: Path | None) -> Path:
    """The CSV to scan: ``--csv``, else the ``train.csv`` of ``--dataset DIR``."""
    if csv_path is not None:
        return require_file(csv_path, "--csv")
    if dataset is None:
        raise ValueError("pass --dataset DIR (its train.csv is scanned) or --csv FILE")
    if not Path(dataset).is_dir():
        raise ValueError(f"--dataset {dataset} is not a directory; give a dataset directory")
    return require_file(Path(dataset) / TRAIN_CSV, f"--dataset {dataset}: {TRAIN_CSV}")


def read_pairs(path: Path | str) -> Pairs:
    """The image paths and captions of a tab-separated CSV (``filepath``, ``title``).

    Image paths resolve as ``roclip eval`` resolves them (absolute, from the working directory,
    or beside the CSV); a ``__key__`` column is kept to name rows of WebDataset samples.
    """
    path = Path(path)
    records = read_rows(path, (IMAGE_KEY, CAPTION_KEY), "--csv")
    if not records:
        raise ValueError(f"--csv {path} has a header but no rows; scan a CSV with pairs")
    filepaths = [resolve_image(r[IMAGE_KEY] or "", path) for r in records]
    captions = [r[CAPTION_KEY] or "" for r in records]
    keys = [r[KEY_COLUMN] or "" for r in records] if KEY_COLUMN in records[0] else None
    return Pairs(path, filepaths, captions, keys)


def check_images(pairs: Pairs) -> None:
    """Fail before any embedding on the first image file that does not exist, naming its row.

    Shards were checked when read (every sample has an image member).
    """
    if pairs.shards:
        return
    for row, image in enumerate(pairs.filepaths):
        if not Path(image).is_file():
            raise ValueError(
                f"image {image} ({pairs.where(row)}) does not exist; fix the path (absolute, "
                "or relative to the working directory or the CSV's folder) or drop the row"
            )


def identity(pairs: Pairs, checkpoint: Path | str, model: str) -> dict[str, Any]:
    """What the embeddings depend on, recorded so that ``--resume`` refuses anything else.

    The CSV by content (a SHA-256: the same rows in another file resume), the checkpoint by
    path, size and modification time (hashing gigabytes of weights to resume would cost what
    the resume saves).
    """
    stat = Path(checkpoint).stat()
    return {
        **data_identity(pairs),
        "rows": len(pairs),
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_bytes": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "model": model,
    }


def data_identity(pairs: Pairs) -> dict[str, Any]:
    """The data by content: the CSV's SHA-256, or the shards' keys and captions and sizes.

    Reading every image again to hash the shards would cost half an embedding pass; the keys,
    captions and each local shard's size catch a changed, added or removed sample.
    """
    if pairs.csv is not None:
        return {"csv_sha256": hashlib.sha256(pairs.csv.read_bytes()).hexdigest()}
    digest = hashlib.sha256()
    for key, caption in zip(pairs.keys or [], pairs.captions, strict=True):
        digest.update(f"{key}\t{caption}\n".encode())
    sizes = [Path(u).stat().st_size if Path(u).is_file() else None for u in pairs.shards]
    return {"shards": list(pairs.shards), "shard_bytes": sizes, "samples": digest.hexdigest()}


def chunk_images(
    pairs: Pairs, store: EmbeddingStore, todo: Sequence[int] | None = None
) -> Iterator[tuple[range, list[Any]]]:
    """The rows and image sources (paths, or bytes streamed from shards) of each chunk to embed.

    ``todo``: the chunks, ascending (default: every missing one).
    """
    chunks = [store.rows(c) for c in (store.missing() if todo is None else todo)]
    if pairs.shards:
        from roclip_kit.data.shards import stream_chunks

        yield from stream_chunks(pairs.shards, pairs.keys or [], chunks)
        return
    for rows in chunks:
        yield rows, pairs.filepaths[rows.start : rows.stop]


def embed_pairs(
    loaded: LoadedModel,
    pairs: Pairs,
    store: EmbeddingStore,
    *,
    batch_size: int = 64,
    progress: Advance | None = None,
    todo: Sequence[int] | None = None,
) -> None:
    """Embed the chunks ``todo`` (default: every missing one); each is on disk before the next.

    ``progress`` is advanced by the images of each batch.
    """
    for rows, sources in chunk_images(pairs, store, todo):
        chunk = rows.start // store.chunk_size
        images = encode_images(
            loaded,
            sources,
            batch_size=batch_size,
            progress=progress,  # per batch: the time left settles within seconds
            where=lambda i, start=rows.start: pairs.where(start + i),
        )
        texts = encode_distinct(loaded, pairs.captions[rows.start : rows.stop])
        store.write(chunk, images.numpy(), texts)


def encode_distinct(loaded: LoadedModel, captions: Sequence[str]) -> np.ndarray:
    """Caption embeddings, each distinct caption of the chunk encoded once.

    Templated captions repeat (the benchmark's 60,960 captions hold 11,907 distinct ones), and
    the text tower is a fifth of the embedding time; a chunk's duplicates cost nothing. Per
    chunk, not per dataset, so the memory stays bounded on web data whose captions are unique.
    """
    distinct, inverse = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    features = encode_texts(loaded, [str(c) for c in distinct], batch_size=256).numpy()
    return features[inverse.reshape(-1)]


def _no_barrier() -> None:
    """One process waits for no other."""


@dataclass(frozen=True)
class Ranks:
    """A process's place among the processes of one scan (torchrun's ranks).

    Rank ``r`` of ``world`` embeds the missing chunks ``r, r + world, ...`` into the shared
    store; after ``barrier`` (every rank has written its chunks) rank 0 alone scores.
    """

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = _no_barrier


@dataclass
class ScanResult:
    """Every pair's scores, and what the scan cost."""

    pairs: Pairs
    scores: dict[str, np.ndarray]
    settings: ScanSettings
    embed_seconds: float
    score_seconds: float
    embedded: int  # pairs embedded by this call (fewer than all when resumed)
    notes: list[str] = field(default_factory=list)

    @property
    def pairs_per_second(self) -> float | None:
        """Pairs embedded and scored per second of this call (None when all were resumed)."""
        if self.embedded == 0:
            return None
        return self.embedded / max(self.embed_seconds + self.score_seconds, 1e-9)


def scan_pairs(
    loaded: LoadedModel,
    pairs: Pairs,
    folder: Path | str,
    settings: ScanSettings | None = None,
    *,
    resume: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = 64,
    progress: Callable[[str, int], Advance] | None = None,
    identity_of: Mapping[str, Any] | None = None,
    ranks: Ranks | None = None,
) -> ScanResult | None:
    """Embed ``pairs`` with ``loaded`` into ``folder`` (resumable), then score them.

    Args:
        loaded: the model (:func:`roclip_kit.train.models.load_openclip`).
        pairs: what to scan (:func:`read_pairs`).
        folder: where the embedding chunks and their progress record go.
        settings: the detectors' settings.
        resume: continue the embeddings already in ``folder``; otherwise ``folder`` must not
            hold a scan.
        chunk_size: pairs per chunk on disk (what a stop can lose).
        batch_size: images per forward pass.
        progress: ``progress(description, total)`` returns a callback advanced per chunk.
        identity_of: what the embeddings depend on (default: the CSV and the checkpoint).
        ranks: this process's share of a scan split over processes (default: all of it).

    Returns:
        The scores; None on a rank other than 0, which only embeds.
    """
    settings, ranks = settings or ScanSettings(), ranks or Ranks()
    check_images(pairs)
    ident = dict(identity_of or identity(pairs, loaded.checkpoint, loaded.name))
    store = open_store(Path(folder), len(pairs), chunk_size, ident, resume=resume, ranks=ranks)
    missing = store.missing()
    mine = missing[ranks.rank :: ranks.world]
    todo = sum(len(store.rows(c)) for c in mine)
    notes = []
    if resume and len(missing) < store.chunks:
        done = len(pairs) - sum(len(store.rows(c)) for c in missing)
        notes.append(f"resumed: {done} of {len(pairs)} pairs already embedded")
    started = time.perf_counter()
    advance = progress("embedding pairs", todo) if progress and todo else None
    embed_pairs(loaded, pairs, store, batch_size=batch_size, progress=advance, todo=mine)
    ranks.barrier()  # every rank's chunks are on disk
    if ranks.rank != 0:
        return None
    if ranks.world > 1:
        store = EmbeddingStore.resume(store.folder, len(pairs), chunk_size, ident)
        notes.append(f"embedded by {ranks.world} processes")
    embedded = time.perf_counter()
    # one step, shown with its elapsed time: the neighbour searches take seconds to minutes
    # (60,000 pairs: about 7 s on two loaded cores), and a silent terminal looks stuck
    scored = progress("scoring (neighbour search)", 1) if progress else None
    images, captions = store.load(mapped=True)  # read in place, block by block
    scores = score_embeddings(images, captions, settings, scratch=store.folder)
    if scored is not None:
        scored(1)
    done = time.perf_counter()
    return ScanResult(pairs, scores, settings, embedded - started, done - embedded, todo, notes)


def open_store(
    folder: Path, total: int, chunk_size: int, ident: dict[str, Any], *, resume: bool, ranks: Ranks
) -> EmbeddingStore:
    """The store of this scan: rank 0 creates (or resumes) it, then the other ranks join it.

    Every rank reads the same record after the barrier, so all agree on the missing chunks
    before any writes one.
    """
    if ranks.rank == 0:
        opener = EmbeddingStore.resume if resume else EmbeddingStore.create
        store = opener(folder, total, chunk_size, ident)
    ranks.barrier()
    if ranks.rank != 0:
        store = EmbeddingStore.resume(folder, total, chunk_size, ident, writer=ranks.rank)
    ranks.barrier()  # nobody writes a chunk before every rank has read the record
    return store


def use_threads(threads: int) -> None:
    """Run torch's and faiss's CPU work on ``threads`` threads (0: leave their defaults).

    Both default to one thread per core and spin while they wait for each other; on a
    machine whose cores are busy with other work, those threads wait on each other instead of
    computing (measured: 142 s to embed 60,000 pairs on two busy cores with two threads, 23 s
    with one).
    """
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


# ---------------------------------------------------------------- outputs


def ranked_rows(scores: Mapping[str, np.ndarray], by: str = "combined") -> np.ndarray:
    """Rows from most to least suspicious by detector ``by`` (ties to the lower row)."""
    return top_rows(scores[by], len(scores[by]))


def write_scores_csv(path: Path, result: ScanResult, by: str = "combined") -> Path:
    """The ranked pairs: rank, row, key, caption, then every detector's score.

    Tab-separated like the kit's other CSVs; ``row`` is the CSV's 0-based data row (what a
    manifest and ``suspicious_epoch_N.csv`` use), ``key`` the ``__key__`` where there is one.
    """
    pairs, scores = result.pairs, result.scores
    lines = [["rank", "row", "key", "caption", *DETECTORS]]
    for rank, row in enumerate(ranked_rows(scores, by), 1):
        key = pairs.keys[row] if pairs.keys is not None else ""  # no key: the row says it
        values = [f"{scores[name][row]:.6g}" for name in DETECTORS]
        lines.append([str(rank), str(row), key, pairs.captions[row], *values])
    return atomic_write_text(path, _tsv(lines))


def _tsv(lines: Sequence[Sequence[str]]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, delimiter=CSV_SEPARATOR, lineterminator="\n").writerows(lines)
    return buffer.getvalue()


def poisoned_by_attack(manifest: Path | str, pairs: Pairs) -> dict[str, np.ndarray]:
    """Per attack kind, a boolean mask of the scanned rows the manifest lists as poisoned.

    Entries name a row (``"row"``) or, for WebDataset samples, a ``"key"`` matched against
    the CSV's ``__key__`` column. A manifest of another CSV is refused: rows out of range,
    or keys the CSV does not hold.
    """
    try:
        read = read_manifest(manifest)
    except ValueError as err:
        raise ValueError(f"--manifest: {err}; pass the manifest.json of the poisoned CSV") from None
    masks = {kind: np.zeros(len(pairs), dtype=bool) for kind in ATTACKS}
    key_rows = {k: i for i, k in enumerate(pairs.keys or [])}
    entries = [(f"row {r}", r, kind) for r, kind in read.rows.items()]
    entries += [(f"key {k!r}", key_rows.get(k, -1), kind) for k, kind in read.keys.items()]
    for entry, row, kind in entries:
        if kind not in masks:
            raise ValueError(f"--manifest {manifest}: unknown attack {kind!r} (not {ATTACKS})")
        if not 0 <= row < len(pairs):
            raise ValueError(
                f"--manifest {manifest} lists {entry} which is not a row of {pairs.source} "
                f"({len(pairs)} rows): pass the manifest written with this CSV"
            )
        masks[kind][row] = True
    return masks


def detection_report(
    scores: Mapping[str, np.ndarray], poisoned: Mapping[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """AUROC and precision@k per detector, over all poison and per attack kind.

    ``k`` is the number of poisoned rows of the group. Each attack kind is judged against the
    clean rows only (the other kind left out), so one attack's rows neither help nor hurt
    the other's figures.
    """
    clean = ~np.logical_or.reduce(list(poisoned.values()))
    groups = {"all": ~clean, **poisoned}
    report: dict[str, dict[str, Any]] = {}
    for name in DETECTORS:
        report[name] = {}
        for group, mask in groups.items():
            if not mask.any():
                continue
            keep = clean | mask
            values, positive = scores[name][keep], mask[keep]
            report[name][group] = {
                "auroc": auroc(values, positive),
                "precision_at_k": precision_at_k(values, positive),
                "k": int(positive.sum()),
            }
    return report


def markdown_report(report: Mapping[str, Any]) -> str:
    """The report as a markdown table (detectors by rows, groups by columns) and its notes."""
    lines = [f"# roclip scan: {report['csv']}", "", f"{report['rows']} pairs scanned."]
    detection = report.get("detection")
    if detection:
        groups = [g for g in ("all", *ATTACKS) if g in next(iter(detection.values()))]
        lines += ["", "| detector | " + " | ".join(f"{g} AUROC | {g} P@k" for g in groups) + " |"]
        lines.append("|---|" + "---|---|" * len(groups))
        for name, figures in detection.items():
            cells = [
                f"{figures[g]['auroc']:.4f} | {figures[g]['precision_at_k']:.4f}" for g in groups
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        counts = ", ".join(f"{g}: k = {detection['combined'][g]['k']}" for g in groups)
        lines += ["", f"Precision at k with k = the group's poisoned rows ({counts})."]
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def draw_histograms(scores: Mapping[str, np.ndarray], path: Path) -> Path:
    """Each detector's score distribution, one panel each, on matplotlib's Agg canvas.

    Without a manifest nothing says which rows are poisoned; a separate mode or a long tail
    at the high end is what a reader looks for before choosing how many rows to drop.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 4
    rows = -(-len(DETECTORS) // columns)  # as many rows of panels as the detectors need
    figure = Figure(figsize=(10, 3 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for i, name in enumerate(DETECTORS):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.hist(scores[name], bins=60, log=True, color="tab:blue")
        axes.set_title(name)
        axes.set_xlabel("score (higher = more suspicious)")
        axes.set_ylabel("pairs")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def drop_size(total: int, fraction: float | None, count: int | None) -> int:
    """How many top-ranked rows to drop: ``count``, or ``fraction`` of ``total`` rounded up."""
    if count is not None:
        return min(count, total)
    return min(total, int(np.ceil((fraction or 0.0) * total)))


def write_filtered_csv(source: Path, target: Path, drop: np.ndarray) -> Path:
    """``source`` without the data rows in ``drop``: same header, columns and separator.

    The result is an ordinary OpenCLIP training CSV (``--train-data``), so retraining on the
    cleaned data needs no tool of this project.
    """
    dropped = set(int(r) for r in drop)
    with source.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh, delimiter=CSV_SEPARATOR))
    kept = [rows[0]] + [r for i, r in enumerate(rows[1:]) if i not in dropped]
    return atomic_write_text(target, _tsv(kept))


def write_kept_keys(target: Path, pairs: Pairs, drop: np.ndarray) -> Path:
    """The ``__key__`` (or data row, where there are no keys) of each kept pair, one a line.

    In dataset order. For shards this is the filter's output (a tar cannot drop a sample in
    place): a loader keeps the samples whose key is listed.
    """
    dropped = np.zeros(len(pairs), dtype=bool)
    dropped[np.asarray(drop, dtype=np.int64)] = True
    lines = [pairs.key_of(row) for row in np.flatnonzero(~dropped)]
    return atomic_write_text(target, "".join(f"{line}\n" for line in lines))


def report_dict(result: ScanResult, detection: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON report: inputs, settings, cost, and detection figures when a manifest was given."""
    s = result.settings
    return {
        "csv": result.pairs.source,
        "rows": len(result.pairs),
        "settings": {
            "k": s.k,
            "reference_size": s.reference_size,
            "peer_reference_size": s.peer_reference_size,
            "misfit_trim": s.misfit_trim,
            "misfit_sample": s.misfit_sample,
            "seed": s.seed,
            "duplicate_quantile": s.duplicate_quantile,
            "caption_sample": s.caption_sample,
            "exact_limit": s.exact_limit,
            "block": s.block,
        },
        "threads": torch_threads(),
        "embed_seconds": round(result.embed_seconds, 3),
        "score_seconds": round(result.score_seconds, 3),
        "pairs_embedded": result.embedded,
        "pairs_per_second": result.pairs_per_second,
        "detection": detection,
        "notes": result.notes,
    }


def torch_threads() -> int:
    """The CPU threads torch computes with, recorded beside the timings they explain."""
    import torch

    return torch.get_num_threads()


def write_report(folder: Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``folder``."""
    json_path = atomic_write_text(folder / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    return json_path, atomic_write_text(folder / REPORT_MD, markdown_report(report))
