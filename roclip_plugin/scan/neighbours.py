"""Nearest neighbours by inner product with faiss, the query's own row left out.

Every detector of a scan asks the same question: the ``k`` most cosine-similar rows of a bank
(the reference images, every image, the distinct captions) for each row of the dataset. Exact
search (``IndexFlatIP``) keeps scores reproducible and comparable between runs, and is the
default. An all-pairs search grows with the square of the rows, though (15 s for 60,000 images
on two loaded cores), so a search may ask for an inverted-file index above ``exact_limit``
bank rows: it compares each query with the bank rows of its ``nprobe`` nearest cells only. An
identical vector always falls in the query's own cell, and near-duplicates almost always do
(measured: 99.99% of the neighbours closer than three duplicate scales at 60,000 images), so
what the targeted score weighs stays found; far neighbours, which it weighs at ``exp(-10)``
and less, may be swapped for slightly farther ones.

A row that is also in the bank would find itself at similarity 1 and hide its true
neighbourhood, so it is removed by id, not by value (an exact duplicate of another row is a
real neighbour: the targeted attack's signature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

IVF_PROBES = 8  # cells an IVF search reads per query
DISTANCE_FLOOR = 1e-6  # duplicates are at distance 0: logs and ratios need a floor


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


def as_rows(matrix: np.ndarray, what: str, block: int = 65_536) -> np.ndarray:
    """``matrix`` as a C-contiguous float32 ``[n, dim]`` array, the layout faiss reads.

    A float32 memory map stays one (no copy): scoring reads the store's files in place. The
    finiteness check runs in blocks, so it never holds a ``[n, dim]`` mask.
    """
    array = np.ascontiguousarray(matrix, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty [rows, dim] matrix, got {array.shape}")
    for start in range(0, len(array), block):
        if not np.isfinite(array[start : start + block]).all():
            raise ValueError(f"{what}: holds NaN or inf values; re-embed with a finite model")
    return array


def row_blocks(count: int, block: int | None) -> list[slice]:
    """``range(count)`` cut into slices of ``block`` rows (None: one slice of all)."""
    step = count if block is None else max(1, block)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def search_index(bank: np.ndarray, exact_limit: int | None = None, seed: int = 0) -> Any:
    """A faiss index holding ``bank``: flat (exact) up to ``exact_limit`` rows, else IVF.

    The IVF's cells are about ``sqrt(rows)`` (k-means on a seeded sample of 64 rows a cell,
    what faiss asks for), of which each query searches ``IVF_PROBES``: a query reads about
    ``rows * IVF_PROBES / sqrt(rows)`` vectors instead of ``rows``.
    """
    dim = bank.shape[1]
    if exact_limit is None or len(bank) <= exact_limit:
        index = faiss.IndexFlatIP(dim)
        index.add(bank)
        return index
    cells = max(1, int(np.sqrt(len(bank))))
    sample = np.random.default_rng(seed).choice(len(bank), min(len(bank), 64 * cells), False)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
    index.train(bank[np.sort(sample)])
    index.add(bank)
    index.nprobe = min(IVF_PROBES, cells)
    return index


@dataclass(frozen=True)
class Bank:
    """Rows to search, built into a faiss index once and searched block by block.

    ``rows`` is kept for the exact distances (a memory map is read in place); ``ids`` are
    the rows' dataset rows, so a query never finds its own row.
    """

    index: Any
    rows: np.ndarray
    ids: np.ndarray | None = None


def build_bank(
    bank: np.ndarray,
    *,
    ids: np.ndarray | None = None,
    exact_limit: int | None = None,
    seed: int = 0,
) -> Bank:
    """``bank`` indexed for :func:`search` (flat up to ``exact_limit`` rows, else IVF)."""
    rows = as_rows(bank, "bank")
    return Bank(
        search_index(rows, exact_limit, seed), rows, None if ids is None else np.asarray(ids)
    )


def check_k(k: int, bank_rows: int, shared: bool) -> None:
    """Refuse ``k`` beyond the bank's rows (less the query's own, where it is in the bank)."""
    available = bank_rows - (1 if shared else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} neighbours asked of a bank of {available} other rows")


def nearest(
    queries: np.ndarray,
    bank: np.ndarray,
    k: int,
    *,
    query_ids: np.ndarray | None = None,
    bank_ids: np.ndarray | None = None,
    exact_limit: int | None = None,
    seed: int = 0,
) -> Neighbours:
    """The ``k`` most similar bank rows of each query, leaving out a bank row with its own id.

    Args:
        queries: ``[n, dim]`` L2-normalised rows.
        bank: ``[m, dim]`` L2-normalised rows.
        k: neighbours per query (at most the bank's size, less one when ids are given).
        query_ids: each query's dataset row; with ``bank_ids``, the bank entry of the same row
            is not a neighbour.
        bank_ids: each bank row's dataset row.
        exact_limit: banks of more rows are searched with an IVF index (None: always exact).
        seed: draws the IVF's training sample.
    """
    queries = as_rows(queries, "queries")
    exclude = query_ids is not None and bank_ids is not None
    shared = exclude and bool(np.isin(np.asarray(query_ids), np.asarray(bank_ids)).any())
    check_k(k, len(bank), shared)
    built = build_bank(bank, ids=bank_ids if exclude else None, exact_limit=exact_limit, seed=seed)
    return search(built, queries, k, query_ids=query_ids if exclude else None)


def search(
    bank: Bank, queries: np.ndarray, k: int, *, query_ids: np.ndarray | None = None
) -> Neighbours:
    """The ``k`` most similar rows of a built bank for each query (one block of queries).

    With ``query_ids`` (and the bank's ids), a bank row of the query's own row is skipped.
    Callers check ``k`` (:func:`check_k`) once for all blocks.
    """
    queries = as_rows(queries, "queries")
    exclude = query_ids is not None and bank.ids is not None
    index = bank.index
    wanted = min(k + 1, len(bank.rows)) if exclude else k
    similarity, position = index.search(queries, wanted)
    if (position < 0).any():  # an IVF's probed cells held fewer than k rows: search them all
        index.nprobe = index.nlist
        similarity, position = index.search(queries, wanted)
    if exclude:
        own = bank.ids[position] == np.asarray(query_ids)[:, None]
        keep = np.argsort(own, axis=1, kind="stable")[:, :k]  # own row last, order kept
        position = np.take_along_axis(position, keep, axis=1)
        similarity = np.take_along_axis(similarity, keep, axis=1)
    position = position.astype(np.int64)
    distance = exact_distances(queries, bank.rows, position)
    return Neighbours(position, similarity.astype(np.float32), distance)
