"""The embedding store: chunks on disk, a stopped scan resumed to the same ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from roclip_plugin.scan import EmbeddingStore, ScanSettings, score_embeddings, top_rows

from .data import planted

IDENTITY = {"data": "train.csv", "model": "epoch_3.pt"}


def _fill(store: EmbeddingStore, images: np.ndarray, captions: np.ndarray, stop: int | None):
    for done, chunk in enumerate(store.missing()):
        if stop is not None and done == stop:
            return
        rows = store.rows(chunk)
        store.write(chunk, images[rows.start : rows.stop], captions[rows.start : rows.stop])


def test_a_resumed_scan_ranks_as_an_uninterrupted_one(tmp_path: Path) -> None:
    data = planted(seed=6)
    n = len(data.images)
    whole = EmbeddingStore.create(tmp_path / "whole", n, 100, IDENTITY)
    _fill(whole, data.images, data.captions, stop=None)

    stopped = EmbeddingStore.create(tmp_path / "stopped", n, 100, IDENTITY)
    _fill(stopped, data.images, data.captions, stop=3)
    (tmp_path / "stopped" / "images_000004.npy").write_bytes(b"torn")  # a write cut short
    resumed = EmbeddingStore.resume(tmp_path / "stopped", n, 100, IDENTITY)
    assert resumed.done == {0, 1, 2} and resumed.missing()[0] == 3
    _fill(resumed, data.images, data.captions, stop=None)

    settings = ScanSettings(reference_size=300, seed=2)
    a = score_embeddings(*whole.load(), settings)
    reopened = EmbeddingStore.resume(tmp_path / "stopped", n, 100, IDENTITY)
    b = score_embeddings(*reopened.load(), settings)
    for name in a:
        assert np.array_equal(top_rows(a[name], n), top_rows(b[name], n)), name
    assert np.array_equal(whole.load()[0], data.images)


def test_a_store_of_other_data_or_model_is_not_resumed(tmp_path: Path) -> None:
    EmbeddingStore.create(tmp_path, 10, 4, IDENTITY)
    with pytest.raises(ValueError, match="add --resume to continue it"):
        EmbeddingStore.create(tmp_path, 10, 4, IDENTITY)
    with pytest.raises(ValueError, match=r"records identity .* it is another scan's"):
        EmbeddingStore.resume(tmp_path, 10, 4, {**IDENTITY, "model": "epoch_4.pt"})
    with pytest.raises(ValueError, match="records chunk_size 4, this scan has 5"):
        EmbeddingStore.resume(tmp_path, 10, 5, IDENTITY)
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        EmbeddingStore.resume(tmp_path, 10, 4, IDENTITY)


def test_loading_an_unfinished_store_and_a_wrong_chunk_are_refused(tmp_path: Path) -> None:
    store = EmbeddingStore.resume(tmp_path / "new", 10, 4, IDENTITY)  # nothing to resume: new
    assert store.missing() == [0, 1, 2] and store.rows(2) == range(8, 10)
    with pytest.raises(ValueError, match="chunk 2: 4 images rows, expected 2"):
        store.write(2, np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="3 of 3 chunks not embedded yet"):
        store.load()
    record = json.loads((tmp_path / "new" / "progress.json").read_text())
    assert record["done"] == [] and record["identity"] == IDENTITY


def test_a_mapped_load_reads_the_same_embeddings_from_one_file_a_side(tmp_path: Path) -> None:
    data = planted(seed=9)
    store = EmbeddingStore.create(tmp_path, len(data.images), 128, IDENTITY)
    _fill(store, data.images, data.captions, stop=None)
    images, captions = store.load(mapped=True)
    assert isinstance(images, np.memmap) and not images.flags.writeable
    assert np.array_equal(images, data.images) and np.array_equal(captions, data.captions)
    assert sorted(p.name for p in tmp_path.glob("*s.npy")) == ["captions.npy", "images.npy"]
    settings = ScanSettings(reference_size=300, seed=2, block=50)
    mapped = score_embeddings(images, captions, settings, scratch=tmp_path)
    in_memory = score_embeddings(data.images, data.captions, settings)
    for name, values in in_memory.items():
        assert np.array_equal(mapped[name], values), name


def test_writers_keep_their_own_progress_files_and_a_reopened_store_merges_them(
    tmp_path: Path,
) -> None:
    data = planted(seed=10)
    n = len(data.images)
    first = EmbeddingStore.create(tmp_path, n, 100, IDENTITY)
    second = EmbeddingStore.resume(tmp_path, n, 100, IDENTITY, writer=1)
    for store, chunks in ((first, first.missing()[0::2]), (second, second.missing()[1::2])):
        for chunk in chunks:
            rows = store.rows(chunk)
            store.write(
                chunk, data.images[rows.start : rows.stop], data.captions[rows.start : rows.stop]
            )
    assert json.loads((tmp_path / "progress.1.json").read_text())["done"] == [1, 3, 5]
    merged = EmbeddingStore.resume(tmp_path, n, 100, IDENTITY)
    assert merged.missing() == [] and np.array_equal(merged.load()[1], data.captions)
    record = tmp_path / "progress.1.json"
    record.write_text(record.read_text().replace('"chunk_size": 100', '"chunk_size": 7'))
    with pytest.raises(ValueError, match=r"progress.1.json records chunk_size 7"):
        EmbeddingStore.resume(tmp_path, n, 100, IDENTITY)
    (tmp_path / "progress.json").unlink()  # no record: a new store, stale writers' files gone
    EmbeddingStore.create(tmp_path, n, 100, IDENTITY)
    assert not record.exists()
