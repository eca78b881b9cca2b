"""Scores read over each image's nearest images of the whole dataset: poison comes in groups.

One search finds every image's ``k`` nearest images among all the others (exact up to
``exact_limit`` rows, an IVF index above), and two kinds of score read it:

- ``targeted``: caption agreement among an image's near-duplicates. A targeted attack pairs
  one image with tens of captions of another class, so its copies are duplicates whose
  captions agree.
- the group scores (``peer_group``, ``misfit_group``): a pair's own score plus the mean score
  of its nearest images. A poison is seldom alone: once a model has learned a backdoor, its
  copies are one another's nearest images (measured on the benchmark's 1% backdoor: 97% of a
  copy's 16 nearest images are copies), and a targeted attack's copies are duplicates, so
  each poisoned pair's neighbours score as high as it does. A clean pair that scores high by
  chance (a loose class, an odd photograph) sits among clean neighbours that do not, and the
  mean pulls it back. This is what lifts a 1% backdoor, whose copies are too many to look
  rare to any one-pair score, to the top of the ranking (docs/scan.md).

The neighbour tables (index, distance, caption agreement: 24 bytes a neighbour) are kept in
memory, or with ``scratch`` in ``.npy`` memory maps there, read back block by block.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from roclip_plugin.scan.distinct import row_groups
from roclip_plugin.scan.neighbours import (
    DISTANCE_FLOOR,
    build_bank,
    check_k,
    row_blocks,
    search,
)


@dataclass(frozen=True)
class ImageNeighbours:
    """Each row's ``k`` nearest images of the whole dataset (itself left out), best first."""

    index: np.ndarray  # int64 [n, k]: the neighbours' dataset rows
    distance: np.ndarray  # float64 [n, k]: Euclidean, from the vectors
    agreement: np.ndarray  # float64 [n, k]: max(cos(c_i, c_j), 0) of the two captions
    images: np.ndarray = field(repr=False)  # the searched vectors, for :attr:`copies`
    block: int | None = None

    @cached_property
    def copies(self) -> np.ndarray:
        """int64 [n]: each row's image value, one id per distinct vector.

        Only the group scores need it, so it is computed on first use: a targeted-only call
        does not hash every vector (half a second at 60,000 rows of 256 floats on 2 cores).
        """
        return row_groups(self.images, self.block)[2]


@contextmanager
def image_neighbours(
    images: np.ndarray,
    captions: np.ndarray,
    k: int,
    *,
    exact_limit: int | None = None,
    seed: int = 0,
    block: int | None = None,
    scratch: Path | str | None = None,
) -> Iterator[ImageNeighbours]:
    """Search every image's ``k`` nearest images once; the tables live while the block runs.

    ``k`` is capped at the other rows' count. With ``scratch`` the tables are memory maps in
    a temporary folder there, removed when the block ends.
    """
    n = len(images)
    rows = np.arange(n)
    k = min(k, n - 1)
    check_k(k, n, True)
    built = build_bank(images, ids=rows, exact_limit=exact_limit, seed=seed)
    with neighbour_tables(n, k, scratch) as (index, distance, agreement):
        for part in row_blocks(n, block):
            found = search(built, images[part], k, query_ids=rows[part])
            index[part] = found.index
            distance[part] = found.distance
            together = neighbour_agreement(captions, found.index, offset=part.start)
            agreement[part] = np.clip(together, 0.0, None)
        yield ImageNeighbours(index, distance, agreement, images, block)


def targeted_score(
    images: np.ndarray,
    captions: np.ndarray,
    k: int,
    duplicate_quantile: float,
    *,
    exact_limit: int | None = None,
    seed: int = 0,
    block: int | None = None,
    scratch: Path | str | None = None,
) -> np.ndarray:
    """Caption agreement among each image's near-duplicates, over the whole dataset.

    Searches the neighbours (:func:`image_neighbours`, every other row, so no copy of a
    target is missed by sampling) and weighs them (:func:`targeted_from`).
    """
    with image_neighbours(
        images, captions, k, exact_limit=exact_limit, seed=seed, block=block, scratch=scratch
    ) as near:
        return targeted_from(near, duplicate_quantile, block)


def targeted_from(
    near: ImageNeighbours, duplicate_quantile: float, block: int | None = None
) -> np.ndarray:
    """For pair ``i``: ``exp(-d_ij / h) * max(cos(c_i, c_j), 0)`` summed over its neighbours.

    ``h`` is the ``duplicate_quantile`` of the nearest-image distances: duplicates weigh
    about 1, ordinary neighbours next to nothing, so a target image repeated with tens of
    same-class captions stands out, whatever the model's scale of distances. ``h`` needs
    every row's nearest distance before any row is weighed, hence the kept tables.
    """
    nearest_distance = np.asarray(near.distance[:, 0], dtype=np.float64)
    scale = max(float(np.quantile(nearest_distance, duplicate_quantile)), DISTANCE_FLOOR)
    out = np.empty(len(near.index), dtype=np.float64)
    for part in row_blocks(len(out), block):
        out[part] = (np.exp(-near.distance[part] / scale) * near.agreement[part]).sum(axis=1)
    return out


def group_score(values: np.ndarray, near: ImageNeighbours, block: int | None = None) -> np.ndarray:
    """Each row's ``values`` plus the mean of its nearest images' ``values``.

    The own score and the neighbourhood's weigh alike: a poison whose copies are its
    neighbours keeps its score twice over, an isolated clean outlier has it halved against
    typical neighbours. A neighbour's value is the mean over every row holding its very image
    vector: where the ``k``-th place falls among exact duplicates (a targeted attack's
    copies), which of them the search returned depends on row order, their mean does not.
    ``values`` must hold every row (they are gathered by dataset row).
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(near.index):
        raise ValueError(
            f"group_score needs a score for every row: {len(values)} scores, "
            f"{len(near.index)} rows searched"
        )
    shared = np.bincount(near.copies, weights=values) / np.bincount(near.copies)
    out = np.empty(len(values), dtype=np.float64)
    for part in row_blocks(len(values), block):
        neighbours = near.copies[np.asarray(near.index[part])]
        out[part] = values[part] + shared[neighbours].mean(axis=1)
    return out


@contextmanager
def neighbour_tables(
    rows: int, k: int, scratch: Path | str | None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``[rows, k]`` tables of neighbours (int64), distances and agreements (float64).

    Arrays, or with ``scratch`` memory maps in a temporary folder there, removed after.
    """
    kinds = (("index", np.int64), ("distance", np.float64), ("agreement", np.float64))
    if scratch is None:
        arrays = [np.empty((rows, k), kind) for _, kind in kinds]
        yield arrays[0], arrays[1], arrays[2]
        return
    Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="neighbours-") as folder:
        tables = [
            np.lib.format.open_memmap(Path(folder) / f"{name}.npy", "w+", kind, (rows, k))
            for name, kind in kinds
        ]
        try:
            yield tables[0], tables[1], tables[2]
        finally:
            del tables  # the maps close before their folder goes


def neighbour_agreement(
    captions: np.ndarray, index: np.ndarray, block: int = 8192, offset: int = 0
) -> np.ndarray:
    """``cos(c_i, c_j)`` for each row ``i`` and its neighbours ``j = index[i - offset]``.

    Gathering every neighbour's caption at once would hold ``n * k * dim`` floats (250 MB for
    60,000 pairs); blocks keep it to a few MB. ``offset``: the dataset row of ``index[0]``.
    """
    out = np.empty(index.shape, dtype=np.float64)
    for start in range(0, len(index), block):
        rows = slice(start, start + block)
        own = captions[offset + start : offset + min(start + block, len(index))]
        gathered = captions[index[rows]]
        out[rows] = np.einsum("nd,nkd->nk", own, gathered, dtype=np.float64)
    return out
