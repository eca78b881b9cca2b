"""Exact nearest neighbours by inner product (faiss ``IndexFlatIP``), the query's own row left out.

Every detector of a scan asks the same question: the ``k`` most cosine-similar rows of a bank
(the reference images, every image, every caption) for each row of the dataset. Exact search
keeps scores reproducible and comparable between runs; an approximate index would make a
pair's score depend on how the index was trained. A row that is also in the bank would find
itself at similarity 1 and hide its true neighbourhood, so it is removed by id, not by value
(an exact duplicate of another row is a real neighbour: the targeted attack's signature).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class Neighbours:
    """``k`` neighbours per query: their bank positions and cosine similarities, best first."""

    index: np.ndarray  # int64 [queries, k], positions in the bank
    similarity: np.ndarray  # float32 [queries, k], descending
    distance: np.ndarray  # float64 [queries, k], Euclidean, recomputed from the vectors


def exact_distances(
    queries: np.ndarray, bank: np.ndarray, index: np.ndarray, block: int = 8192
) -> np.ndarray:
    """Euclidean distances from each query to its neighbours ``bank[index]``, in float64.

    Taken from the difference vectors, not from ``sqrt(2 - 2 cos)``: a float32 cosine of two
    identical rows is 1 only up to rounding, which puts a duplicate anywhere up to 1e-3 away,
    differently for each row order; density ratios and the duplicate weights divide by such
    distances. Blocks keep the gathered neighbours to a few MB.
    """
    out = np.empty(index.shape, dtype=np.float64)
    for start in range(0, len(index), block):
        rows = slice(start, start + block)
        diff = bank[index[rows]].astype(np.float64) - queries[rows, None, :]
        out[rows] = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
    return out


def as_rows(matrix: np.ndarray, what: str) -> np.ndarray:
    """``matrix`` as a C-contiguous float32 ``[n, dim]`` array, the layout faiss reads."""
    array = np.ascontiguousarray(matrix, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty [rows, dim] matrix, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: holds NaN or inf values; re-embed with a finite model")
    return array


def nearest(
    queries: np.ndarray,
    bank: np.ndarray,
    k: int,
    *,
    query_ids: np.ndarray | None = None,
    bank_ids: np.ndarray | None = None,
) -> Neighbours:
    """The ``k`` most similar bank rows of each query, leaving out a bank row with its own id.

    Args:
        queries: ``[n, dim]`` L2-normalised rows.
        bank: ``[m, dim]`` L2-normalised rows.
        k: neighbours per query (at most the bank's size, less one when ids are given).
        query_ids: each query's dataset row; with ``bank_ids``, the bank entry of the same row
            is not a neighbour.
        bank_ids: each bank row's dataset row.
    """
    queries, bank = as_rows(queries, "queries"), as_rows(bank, "bank")
    exclude = query_ids is not None and bank_ids is not None
    available = len(bank) - (1 if exclude else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} neighbours asked of a bank of {available} other rows")
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    wanted = min(k + 1, len(bank)) if exclude else k
    similarity, position = index.search(queries, wanted)
    if exclude:
        own = np.asarray(bank_ids)[position] == np.asarray(query_ids)[:, None]
        keep = np.argsort(own, axis=1, kind="stable")[:, :k]  # own row last, order kept
        position = np.take_along_axis(position, keep, axis=1)
        similarity = np.take_along_axis(similarity, keep, axis=1)
    position = position.astype(np.int64)
    distance = exact_distances(queries, bank, position)
    return Neighbours(position, similarity.astype(np.float32), distance)
