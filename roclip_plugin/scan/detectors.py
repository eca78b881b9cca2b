"""The detectors of a scan: per-pair suspicion scores from image and caption embeddings.

Every score is oriented the same way, **higher = more suspicious**, so one ranking rule, one
AUROC and one "drop the top" serve them all. Inputs are L2-normalised float32 embeddings of
each pair's image and caption (row ``i`` of both is pair ``i``).

- ``cosine``: minus the pair's own image-caption cosine. A caption that does not describe its
  image fits it badly, unless the model already learned the poison.
- ``margin``: the best *other* caption's cosine minus the own caption's (RoCLIP's signal
  after the fact): positive when another caption of the dataset fits the image better. The
  other captions are the dataset's distinct ones (a template repeated on thousands of rows is
  one candidate, so the search is exact at a fraction of the cost), a seeded sample of them
  beyond ``caption_sample``.
- ``kdist``: distance of the image to its ``k``-th nearest reference image. Backdoored images
  sit in a tight cluster of their own, away from clean images; against a reference holding
  few of them (fewer than ``k``) their neighbourhood is sparse.
- ``slof``: ``kdist`` over the mean ``kdist`` of the image's reference neighbours (simplified
  local outlier factor): sparse *relative to its surroundings*, so dense and sparse classes
  compare fairly.
- ``dao``: log of the dimensionality-aware outlier score (Anderberg et al. 2024): the density
  ratio of SLOF raised to each neighbour's local intrinsic dimensionality, which is what
  turns a distance ratio into a density ratio. Best of the three in the local-density paper.
- ``targeted``: many pairs whose images are (near-)duplicates carrying similar captions: a
  targeted attack pairs one image with tens of captions of another class. Weighted sum over
  the image's nearest images of the whole dataset of caption agreement, each weighted by how
  close to a duplicate the image is.
- ``combined``: the highest of the normalised ranks of ``dao``, ``targeted`` and ``cosine``
  (the smallest empirical p-value): one list in which each kind of poison is caught at the
  strength of the detector that sees it: ``dao`` a learned backdoor's sparse cluster,
  ``targeted`` repeated images, ``cosine`` a caption the model did not learn to fit. A rank
  mean of ``dao`` and ``targeted`` halved each attack's signal (measured in docs/scan.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from roclip_plugin.scan.neighbours import Neighbours, as_rows, nearest
from roclip_plugin.scan.ranks import rank_max

DETECTORS = ("cosine", "margin", "kdist", "slof", "dao", "targeted", "combined")
DISTANCE_FLOOR = 1e-6  # duplicates are at distance 0: logs and ratios need a floor


@dataclass(frozen=True)
class ScanSettings:
    """How a scan scores pairs.

    Attributes:
        k: neighbours of the density and targeted scores (16, as in the local-density
            paper). Density detection holds while the poisons in the reference are fewer
            than ``k``.
        reference_size: images of the density reference, drawn at random from the dataset
            (None: every image). Small enough that a backdoor's copies in it stay below
            ``k``: at 1,024 a 1% backdoor puts about 10 there.
        duplicate_quantile: the targeted score's duplicate scale is this quantile of the
            dataset's nearest-image distances: closer than it counts as a (near-)duplicate.
        seed: draws the reference, the caption sample and an IVF's training sample.
        caption_sample: the margin compares each image with at most this many distinct
            captions, drawn at random beyond it (None: all). Exact while the dataset has no
            more distinct captions; at web scale, the all-captions search would be quadratic.
        exact_limit: the targeted score's all-images search is exact (flat) up to this many
            rows, above it an IVF index that finds (near-)duplicates but may swap far
            neighbours (None: always exact). The search grows with the square of the rows.
    """

    k: int = 16
    reference_size: int | None = 1024
    duplicate_quantile: float = 0.05
    seed: int = 0
    caption_sample: int | None = 100_000
    exact_limit: int | None = 20_000

    def __post_init__(self) -> None:
        """Refuse settings that cannot score, naming the field."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        size = self.reference_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 2):
            raise ValueError(f"reference_size must be None or an integer >= 2, got {size!r}")
        if not 0.0 < self.duplicate_quantile < 1.0:
            raise ValueError(f"duplicate_quantile must be in (0, 1), got {self.duplicate_quantile}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("caption_sample", "exact_limit"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 2
            ):
                raise ValueError(f"{name} must be None or an integer >= 2, got {value!r}")


def cosine_score(images: np.ndarray, captions: np.ndarray) -> np.ndarray:
    """Minus each pair's own image-caption cosine."""
    return -np.einsum("nd,nd->n", images, captions, dtype=np.float64)


def margin_score(
    images: np.ndarray, captions: np.ndarray, sample: int | None = None, seed: int = 0
) -> np.ndarray:
    """The best other caption's cosine minus the own caption's, for each image.

    Searched among the distinct caption vectors: the same as every caption of the dataset
    (a caption held by other rows too is another row's caption, so it stays a candidate; one
    held by this row alone is left out), at the cost of the distinct ones. Beyond ``sample``
    distinct captions, a seeded sample of them (the margin is then a lower bound).
    """
    bank, bank_ids = distinct_captions(captions, sample, seed)
    rows = np.arange(len(images))
    best = nearest(images, bank, 1, query_ids=rows, bank_ids=bank_ids).similarity[:, 0]
    return best.astype(np.float64) + cosine_score(images, captions)


def distinct_captions(
    captions: np.ndarray, sample: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct caption vectors and, for each, the row to leave out when it is searched.

    A vector held by one row carries that row's id (it is that row's own caption, not
    another's); one held by several rows carries -1, a row no query has.
    """
    rows = np.ascontiguousarray(captions)
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    # one opaque bytes value a row: a 1-D sort, ten times faster than np.unique(axis=0)
    _, first, counts = np.unique(as_bytes, return_index=True, return_counts=True)
    unique, ids = rows[first], np.where(counts == 1, first, -1)
    if sample is not None and len(unique) > sample:
        keep = np.sort(np.random.default_rng(seed).choice(len(unique), sample, replace=False))
        unique, ids = unique[keep], ids[keep]
    return unique, ids


def reference_rows(count: int, settings: ScanSettings) -> np.ndarray:
    """Sorted dataset rows of the density reference, drawn from ``settings.seed``."""
    size = settings.reference_size
    if size is None or size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(settings.seed).choice(count, size, replace=False))


@dataclass(frozen=True)
class Density:
    """``kdist``, ``slof`` and ``dao`` of every query image against one reference."""

    kdist: np.ndarray
    slof: np.ndarray
    dao: np.ndarray


def local_dimension(distances: np.ndarray, cap: float) -> np.ndarray:
    """Maximum-likelihood local intrinsic dimensionality from k-NN distances.

    ``k / sum_i log(d_k / d_i)`` (Levina-Bickel, Amsaleg et al.), ``d_k`` the largest. Capped
    at ``cap`` (the embedding's dimension, which no local dimension exceeds): equal distances,
    duplicates above all, would otherwise give infinity.
    """
    d = np.maximum(distances, DISTANCE_FLOOR)
    spread = np.log(d.max(axis=1, keepdims=True) / d).sum(axis=1)
    k = distances.shape[1]
    with np.errstate(divide="ignore"):
        lid = np.where(spread > 0, k / np.maximum(spread, 1e-300), np.inf)
    return np.minimum(lid, cap)


def density_scores(
    images: np.ndarray,
    reference: np.ndarray,
    k: int,
    *,
    query_rows: np.ndarray,
    reference_rows: np.ndarray,
) -> Density:
    """k-distance, SLOF and log-DAO of each query image against the reference images.

    The reference's own neighbourhoods (each reference image against the others) give the
    neighbours' k-distances and local dimensions that SLOF and DAO compare with.
    """
    own = nearest(reference, reference, k, query_ids=reference_rows, bank_ids=reference_rows)
    own_kdist = k_distance(own)
    lid = local_dimension(own.distance, cap=float(images.shape[1]))
    found = nearest(images, reference, k, query_ids=query_rows, bank_ids=reference_rows)
    kdist = k_distance(found)
    slof = kdist / own_kdist[found.index].mean(axis=1)
    return Density(kdist, slof, log_dao(kdist, found, own_kdist, lid))


def k_distance(found: Neighbours) -> np.ndarray:
    """The distance to the k-th neighbour, floored (ratios and logs follow).

    The largest of the k float64 distances rather than the last column: faiss orders by the
    float32 cosine, which may rank two near-equal neighbours the other way round.
    """
    return np.maximum(found.distance.max(axis=1), DISTANCE_FLOOR)


def log_dao(
    kdist: np.ndarray, found: Neighbours, own_kdist: np.ndarray, lid: np.ndarray
) -> np.ndarray:
    """``log(mean_o (kdist(q) / kdist(o)) ** lid(o))`` over q's reference neighbours ``o``.

    In logs (``logaddexp``) because the powers reach 10^100 with a local dimension of 30 and
    a ratio of 2000, which a float64 mean would turn into inf.
    """
    exponents = lid[found.index] * (np.log(kdist)[:, None] - np.log(own_kdist[found.index]))
    return np.logaddexp.reduce(exponents, axis=1) - np.log(found.index.shape[1])


def targeted_score(
    images: np.ndarray,
    captions: np.ndarray,
    k: int,
    duplicate_quantile: float,
    *,
    exact_limit: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Caption agreement among an image's near-duplicates, over the whole dataset.

    For pair ``i`` and each of its ``k`` nearest images ``j`` (every other row of the dataset,
    so no copy of a target is missed by sampling): ``exp(-d_ij / h) * max(cos(c_i, c_j), 0)``,
    summed. ``h`` is the ``duplicate_quantile`` of the nearest-image distances: duplicates
    weigh about 1, ordinary neighbours next to nothing, so a target image repeated with tens
    of same-class captions stands out, whatever the model's scale of distances. Above
    ``exact_limit`` rows the search is an IVF index's (:func:`.neighbours.search_index`).
    """
    rows = np.arange(len(images))
    k = min(k, len(images) - 1)
    found = nearest(
        images, images, k, query_ids=rows, bank_ids=rows, exact_limit=exact_limit, seed=seed
    )
    distance = found.distance
    scale = max(float(np.quantile(distance[:, 0], duplicate_quantile)), DISTANCE_FLOOR)
    weight = np.exp(-distance / scale)
    agreement = neighbour_agreement(captions, found.index)
    return (weight * np.clip(agreement, 0.0, None)).sum(axis=1)


def neighbour_agreement(captions: np.ndarray, index: np.ndarray, block: int = 8192) -> np.ndarray:
    """``cos(c_i, c_j)`` for each row ``i`` and its neighbours ``j = index[i]``, in blocks.

    Gathering every neighbour's caption at once would hold ``n * k * dim`` floats (250 MB for
    60,000 pairs); blocks keep it to a few MB.
    """
    out = np.empty(index.shape, dtype=np.float64)
    for start in range(0, len(index), block):
        rows = slice(start, start + block)
        gathered = captions[index[rows]]
        out[rows] = np.einsum("nd,nkd->nk", captions[rows], gathered, dtype=np.float64)
    return out


def score_embeddings(
    images: np.ndarray, captions: np.ndarray, settings: ScanSettings | None = None
) -> dict[str, np.ndarray]:
    """Every detector's score of every pair (``DETECTORS``, higher = more suspicious).

    Args:
        images: ``[n, dim]`` L2-normalised image embeddings.
        captions: ``[n, dim]`` L2-normalised caption embeddings of the same pairs.
        settings: ``k``, the reference and its seed (default :class:`ScanSettings`).
    """
    settings = settings or ScanSettings()
    images, captions = as_rows(images, "image embeddings"), as_rows(captions, "captions")
    if images.shape != captions.shape:
        raise ValueError(
            f"image embeddings {images.shape} and caption embeddings {captions.shape} differ: "
            "row i of both must be pair i"
        )
    n = len(images)
    ref = reference_rows(n, settings)
    if settings.k > len(ref) - 1:
        raise ValueError(
            f"k={settings.k} needs a reference of more than {settings.k} images; the dataset "
            f"gives {len(ref)}: lower k or raise reference_size"
        )
    density = density_scores(
        images, images[ref], settings.k, query_rows=np.arange(n), reference_rows=ref
    )
    scores = {
        "cosine": cosine_score(images, captions),
        "margin": margin_score(images, captions, settings.caption_sample, settings.seed),
        "kdist": density.kdist,
        "slof": density.slof,
        "dao": density.dao,
        "targeted": targeted_score(
            images,
            captions,
            settings.k,
            settings.duplicate_quantile,
            exact_limit=settings.exact_limit,
            seed=settings.seed,
        ),
    }
    scores["combined"] = rank_max([scores["dao"], scores["targeted"], scores["cosine"]])
    return scores
