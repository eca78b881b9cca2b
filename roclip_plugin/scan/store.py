"""Embeddings of a scan on disk: chunked ``.npy`` files and a progress record, for resuming.

Embedding is the slow part of a scan (the model reads every image); a stopped scan must not
start again from zero. Each chunk of ``chunk_size`` pairs is written as two ``.npy`` files
(images, captions), then ``progress.json`` lists it as done; both writes are atomic, so a
chunk is either listed and whole or redone. ``progress.json`` also records what was embedded
(``identity``: the data and the model, as the caller describes them), so a resume against
other data or another checkpoint is refused instead of mixing embeddings of two models.

Several processes (torchrun's ranks) may fill one store: each is a *writer* with its own
progress file (``progress.json`` for writer 0, ``progress.<writer>.json`` for the others), so
no two processes ever write one file; opening the store merges what every file lists as done.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from roclip_plugin.io import atomic_write_bytes, atomic_write_text

STORE_FORMAT = "roclip-scan-embeddings/1"
PROGRESS_FILE = "progress.json"
WRITER_PROGRESS = "progress.*.json"  # the other writers' records


class EmbeddingStore:
    """A folder of embedding chunks of ``total`` pairs, ``chunk_size`` pairs a chunk.

    Use :meth:`create` for a new scan and :meth:`resume` to continue one; then write each
    chunk in :meth:`missing` and :meth:`load` the whole.
    """

    def __init__(
        self,
        folder: Path,
        total: int,
        chunk_size: int,
        identity: dict[str, Any],
        done: set[int] | None = None,
        writer: int = 0,
    ) -> None:
        if total < 1 or chunk_size < 1:
            raise ValueError(
                f"a store needs total >= 1 and chunk_size >= 1 ({total}, {chunk_size})"
            )
        self.folder = Path(folder)
        self.total = total
        self.chunk_size = chunk_size
        self.identity = identity
        self.done: set[int] = set(done or ())
        self.writer = writer

    @property
    def chunks(self) -> int:
        """How many chunks the pairs make."""
        return -(-self.total // self.chunk_size)

    def rows(self, chunk: int) -> range:
        """The pairs of ``chunk``."""
        start = chunk * self.chunk_size
        return range(start, min(start + self.chunk_size, self.total))

    def missing(self) -> list[int]:
        """Chunks still to embed, in order."""
        return [c for c in range(self.chunks) if c not in self.done]

    @classmethod
    def create(
        cls, folder: Path | str, total: int, chunk_size: int, identity: dict[str, Any]
    ) -> EmbeddingStore:
        """A new, empty store; an existing one in ``folder`` is refused (resume it instead)."""
        folder = Path(folder)
        if (folder / PROGRESS_FILE).exists():
            raise ValueError(
                f"{folder} holds a scan's embeddings already: add --resume to continue it, or "
                "choose another --out"
            )
        for stale in folder.glob(WRITER_PROGRESS):  # of an unfinished store with no record
            stale.unlink()
        store = cls(folder, total, chunk_size, identity)
        store._save_progress()
        return store

    @classmethod
    def resume(
        cls,
        folder: Path | str,
        total: int,
        chunk_size: int,
        identity: dict[str, Any],
        writer: int = 0,
    ) -> EmbeddingStore:
        """The store in ``folder``, checked to be of the same pairs, chunking and model.

        A folder without a progress record starts a new store (writer 0 only: the others
        join the store writer 0 made). The chunks done are those every writer's file lists.
        """
        folder = Path(folder)
        path = folder / PROGRESS_FILE
        if not path.exists() and writer == 0:
            return cls.create(folder, total, chunk_size, identity)
        done: set[int] = set()
        for record in (path, *sorted(folder.glob(WRITER_PROGRESS))):
            done |= cls._read_done(record, total, chunk_size, identity)
        return cls(folder, total, chunk_size, identity, done, writer)

    @staticmethod
    def _read_done(path: Path, total: int, chunk_size: int, identity: dict[str, Any]) -> set[int]:
        """The chunks ``path`` lists as done, once its record is checked to be this scan's."""
        folder = path.parent
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{path} cannot be read ({err}); delete {folder} and scan again"
            ) from None
        wanted = {
            "format": STORE_FORMAT,
            "total": total,
            "chunk_size": chunk_size,
            "identity": identity,
        }
        for key, value in wanted.items():
            if record.get(key) != value:
                raise ValueError(
                    f"--resume: {path} records {key} {record.get(key)!r}, this scan has "
                    f"{value!r}; it is another scan's: rerun it with the same data, model and "
                    "--chunk-size, or choose another --out"
                )
        return set(record.get("done") or [])

    def _chunk_path(self, chunk: int, side: str) -> Path:
        return self.folder / f"{side}_{chunk:06d}.npy"

    def write(self, chunk: int, images: np.ndarray, captions: np.ndarray) -> None:
        """Save one chunk's embeddings (float32), then record it as done."""
        expected = len(self.rows(chunk))
        for side, values in (("images", images), ("captions", captions)):
            if len(values) != expected:
                raise ValueError(f"chunk {chunk}: {len(values)} {side} rows, expected {expected}")
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(values, dtype=np.float32))
            atomic_write_bytes(self._chunk_path(chunk, side), buffer.getvalue())
        self.done.add(chunk)
        self._save_progress()

    def _save_progress(self) -> None:
        record = {
            "format": STORE_FORMAT,
            "total": self.total,
            "chunk_size": self.chunk_size,
            "identity": self.identity,
            "done": sorted(self.done),
        }
        name = PROGRESS_FILE if self.writer == 0 else f"progress.{self.writer}.json"
        atomic_write_text(self.folder / name, json.dumps(record, indent=1) + "\n")

    def load(self, mapped: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every pair's image and caption embeddings, ``[total, dim]`` each (all chunks done).

        ``mapped``: join the chunks on disk into ``images.npy`` and ``captions.npy`` (a chunk
        at a time, each read as a memory map) and return read-only memory maps of the two, so
        that scoring reads the embeddings in place instead of holding them: the memory of the
        join is one chunk, its disk the embeddings' size once more.
        """
        if self.missing():
            raise ValueError(
                f"{self.folder}: {len(self.missing())} of {self.chunks} chunks not embedded yet"
            )
        if mapped:
            return self._joined("images"), self._joined("captions")
        sides = []
        for side in ("images", "captions"):
            parts = [np.load(self._chunk_path(c, side)) for c in range(self.chunks)]
            sides.append(np.concatenate(parts))
        return sides[0], sides[1]

    def _joined(self, side: str) -> np.ndarray:
        """The chunks of ``side`` copied into one ``.npy`` file, opened as a memory map."""
        target = self.folder / f"{side}.npy"
        partial = self.folder / f"{side}.npy.partial"
        dim = np.load(self._chunk_path(0, side), mmap_mode="r").shape[1]
        joined = np.lib.format.open_memmap(partial, "w+", np.float32, (self.total, dim))
        for chunk in range(self.chunks):
            rows = self.rows(chunk)
            part = np.load(self._chunk_path(chunk, side), mmap_mode="r")
            if part.shape != (len(rows), dim):
                raise ValueError(
                    f"{self._chunk_path(chunk, side)} holds {part.shape}, expected "
                    f"{(len(rows), dim)}; delete {self.folder} and scan again"
                )
            joined[rows.start : rows.stop] = part
        joined.flush()
        del joined
        os.replace(partial, target)  # a stop mid-join leaves no half-written target
        return np.load(target, mmap_mode="r")
