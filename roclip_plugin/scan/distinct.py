"""The distinct rows of a large matrix, found from 8-byte hashes rather than a sort of the rows.

The margin searches a dataset's distinct caption vectors. ``np.unique`` over the rows sorts a
copy of the whole ``[n, dim]`` matrix (a second copy of every caption embedding); hashing each
row to one 64-bit number reads the rows block by block and holds ``n`` hashes, their order and
the groups' first rows: 24 bytes a pair whatever the dimension. Every row is then compared with
its group's first row, so a hash collision is caught, never trusted (it falls back to the sort).
"""

from __future__ import annotations

import numpy as np

from roclip_plugin.scan.neighbours import row_blocks

HASH_SEED = 0x5EED  # fixed: the same rows hash the same in every scan, in any order


def row_hashes(rows: np.ndarray, block: int | None) -> np.ndarray:
    """One uint64 hash a row: its 32-bit words times fixed odd multipliers, summed mod 2^64."""
    width = rows.shape[1] * rows.dtype.itemsize // 4
    multipliers = np.random.default_rng(HASH_SEED).integers(1, 2**63, width, dtype=np.uint64)
    multipliers |= np.uint64(1)
    out = np.empty(len(rows), dtype=np.uint64)
    for part in row_blocks(len(rows), block):
        words = np.ascontiguousarray(rows[part]).view(np.uint32).astype(np.uint64)
        mixed = (words ^ (words >> np.uint64(7))) * multipliers  # wraps mod 2^64, as meant
        out[part] = mixed.sum(axis=1, dtype=np.uint64)
    return out


def distinct_rows(rows: np.ndarray, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first row of each distinct row value and how many rows hold it, in hash order.

    Hash order depends on the values only, so the result (and a sample drawn from it) is the
    same for any row order.
    """
    first, counts, _ = row_groups(rows, block)
    return first, counts


def row_groups(
    rows: np.ndarray, block: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`distinct_rows` and, for every row, its group: the position of its value there."""
    hashes = row_hashes(rows, block)
    order = np.argsort(hashes, kind="stable")  # within a group: rows ascending
    ordered = hashes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    first = order[starts]
    counts = np.diff(np.r_[starts, len(order)])
    group = np.empty(len(rows), dtype=np.int64)
    group[order] = np.repeat(np.arange(len(starts)), counts)
    if not same_as_first(rows, first[group], block):
        return exact_distinct(rows)
    return first, counts, group


def same_as_first(rows: np.ndarray, firsts: np.ndarray, block: int | None) -> bool:
    """Whether every row equals its group's first row, bit for bit (no hash collision)."""
    for part in row_blocks(len(rows), block):
        mine = np.ascontiguousarray(rows[part]).view(np.uint32)
        theirs = np.ascontiguousarray(rows[firsts[part]]).view(np.uint32)
        if not np.array_equal(mine, theirs):
            return False
    return True


def exact_distinct(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`row_groups` from a sort of the rows as opaque bytes (the collision fallback)."""
    array = np.ascontiguousarray(rows)
    as_bytes = array.view(np.dtype((np.void, array.dtype.itemsize * array.shape[1]))).ravel()
    _, first, group, counts = np.unique(
        as_bytes, return_index=True, return_inverse=True, return_counts=True
    )
    return first, counts, group.reshape(-1).astype(np.int64)
