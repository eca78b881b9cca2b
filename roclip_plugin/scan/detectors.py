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
- ``peers``: how much worse the image fits the images of its caption's peers (the reference
  pairs whose captions are nearest its own) than those images fit each other. Clean images
  look like the images their kind of caption usually comes with; a backdoored image carries
  the target class's caption but another class's content (the trigger is a small part of
  it), so it sits away from the target class's images even after the model has learned the
  trigger, which is when ``cosine`` loses it. Cross-modal like ``cosine``, but read against
  the caption's own spread of images, so loose and tight classes compare fairly.
- ``misfit``: the image's offset from its caption's peers' mean image, measured against the
  shape of those offsets over the dataset (a Mahalanobis distance, its covariance fitted on
  the typical pairs only). ``peers`` weighs every direction alike; a backdoor moves its images
  along directions (the trigger's, the other class's content) in which a clean image hardly
  ever differs from its caption's usual images, so the offset's shape finds it where its
  length does not.
- ``peer_group`` and ``misfit_group``: ``peers`` and ``misfit`` of the pair plus the mean of
  its nearest images' (:mod:`.groups`). Poison comes in groups: a learned backdoor's copies
  are one another's nearest images, a targeted attack's copies are duplicates, so their
  neighbours score as high as they do; a clean pair that scores high alone sits among clean
  neighbours that do not. At 1% a backdoor's copies are too many for any one-pair score to
  find them rare; as a group they rank first.
- ``combined``: the higher of the normalised ranks of ``peer_group`` and ``misfit_group``
  (the smaller empirical p-value): the backdoor at the strength of whichever score sees it
  (``misfit`` where the trigger moves images in a direction clean pairs do not vary in,
  ``peers`` where its offsets are merely long), and the targeted attack's duplicates, whose
  captions all belong to another class, with both. ``targeted`` stays out: its rank of the
  clean pairs is arbitrary (most clean images have no duplicate), so a maximum with it
  passes clean pairs on and costs the backdoor's ranking more than it adds to the targeted
  rows', which the group scores already rank at 0.997 and above. ``cosine`` stays out: where
  the model has learned a backdoor, the clean images of loose classes fit their captions as
  badly as the poisoned ones. The density scores stay out: whether they rank a tight
  backdoor first or last turns on how many of its copies the reference draw holds (all
  measured in docs/scan.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roclip_plugin.scan.distinct import distinct_rows
from roclip_plugin.scan.groups import group_score, image_neighbours, targeted_from
from roclip_plugin.scan.neighbours import (
    DISTANCE_FLOOR,
    Neighbours,
    as_rows,
    build_bank,
    check_k,
    nearest,
    row_blocks,
    search,
)
from roclip_plugin.scan.ranks import rank_max

DETECTORS = (
    "cosine",
    "margin",
    "kdist",
    "slof",
    "dao",
    "peers",
    "misfit",
    "targeted",
    "peer_group",
    "misfit_group",
    "combined",
)
# the scores whose highest rank is ``combined``: each reads a pair with its nearest images
# (poison comes in groups), neither turns on the density reference's draw
COMBINED = ("peer_group", "misfit_group")


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
        peer_reference_size: pairs among which ``peers`` and ``misfit`` look for a caption's
            peers (None: every pair). Large, unlike the density reference: the more pairs,
            the nearer each caption's peers, and a poison stays a minority among the peers of
            its kind of caption however many of its copies the reference holds.
        misfit_trim: the share of the most atypical offsets left out when ``misfit`` fits
            the offsets' covariance (twice refitted without them), so that a poison of up to
            this share of the pairs does not widen the spread it is measured against.
        misfit_sample: ``misfit`` fits its covariance on at most this many pairs, drawn at
            random (None: all): a ``dim x dim`` fit, so a sample of ten thousands is as good
            as all and bounds the memory at web scale.
        duplicate_quantile: the targeted score's duplicate scale is this quantile of the
            dataset's nearest-image distances: closer than it counts as a (near-)duplicate.
        seed: draws the reference, the caption sample and an IVF's training sample.
        caption_sample: the margin compares each image with at most this many distinct
            captions, drawn at random beyond it (None: all). Exact while the dataset has no
            more distinct captions; at web scale, the all-captions search would be quadratic.
        exact_limit: the targeted score's all-images search is exact (flat) up to this many
            rows, above it an IVF index that finds (near-)duplicates but may swap far
            neighbours (None: always exact). The search grows with the square of the rows.
        block: query rows scored at once (None: all). Each detector holds its bank (the
            reference, the distinct captions, the all-images index) and one block's neighbour
            tables, never one per row of the dataset; the scores are the same for any block.
    """

    k: int = 16
    reference_size: int | None = 1024
    peer_reference_size: int | None = 4096
    misfit_trim: float = 0.1
    misfit_sample: int | None = 65_536
    duplicate_quantile: float = 0.05
    seed: int = 0
    caption_sample: int | None = 100_000
    exact_limit: int | None = 20_000
    block: int | None = 65_536

    def __post_init__(self) -> None:
        """Refuse settings that cannot score, naming the field."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        sizes = (
            "reference_size",
            "peer_reference_size",
            "misfit_sample",
            "caption_sample",
            "exact_limit",
        )
        for name in sizes:
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 2
            ):
                raise ValueError(f"{name} must be None or an integer >= 2, got {value!r}")
        if not 0.0 <= self.misfit_trim < 0.5:
            raise ValueError(
                f"misfit_trim must be in [0, 0.5): the share of pairs left out of the fit, "
                f"got {self.misfit_trim}"
            )
        if not 0.0 < self.duplicate_quantile < 1.0:
            raise ValueError(f"duplicate_quantile must be in (0, 1), got {self.duplicate_quantile}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        block = self.block
        if block is not None and (
            isinstance(block, bool) or not isinstance(block, int) or block < 1
        ):
            raise ValueError(f"block must be None or an integer >= 1, got {block!r}")


def cosine_score(images: np.ndarray, captions: np.ndarray, block: int | None = None) -> np.ndarray:
    """Minus each pair's own image-caption cosine (``block`` rows at a time)."""
    out = np.empty(len(images), dtype=np.float64)
    for part in row_blocks(len(images), block):
        out[part] = -np.einsum("nd,nd->n", images[part], captions[part], dtype=np.float64)
    return out


def margin_score(
    images: np.ndarray,
    captions: np.ndarray,
    sample: int | None = None,
    seed: int = 0,
    *,
    block: int | None = None,
) -> np.ndarray:
    """The best other caption's cosine minus the own caption's, for each image.

    Searched among the distinct caption vectors: the same as every caption of the dataset
    (a caption held by other rows too is another row's caption, so it stays a candidate; one
    held by this row alone is left out), at the cost of the distinct ones. Beyond ``sample``
    distinct captions, a seeded sample of them (the margin is then a lower bound).
    """
    bank, bank_ids = distinct_captions(captions, sample, seed, block)
    built = build_bank(bank, ids=bank_ids)
    check_k(1, len(bank), bool((bank_ids >= 0).any()))
    out = np.empty(len(images), dtype=np.float64)
    for part in row_blocks(len(images), block):
        rows = np.arange(part.start, part.stop)
        best = search(built, images[part], 1, query_ids=rows).similarity[:, 0]
        out[part] = best.astype(np.float64) + cosine_score(images[part], captions[part])
    return out


def distinct_captions(
    captions: np.ndarray, sample: int | None, seed: int, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct caption vectors and, for each, the row to leave out when it is searched.

    A vector held by one row carries that row's id (it is that row's own caption, not
    another's); one held by several rows carries -1, a row no query has. In hash order
    (:mod:`.distinct`: no copy of every caption), a seeded sample beyond ``sample``.
    """
    first, counts = distinct_rows(captions, block)
    ids = np.where(counts == 1, first, -1)
    if sample is not None and len(first) > sample:
        keep = np.sort(np.random.default_rng(seed).choice(len(first), sample, replace=False))
        first, ids = first[keep], ids[keep]
    return np.ascontiguousarray(captions[first], dtype=np.float32), ids


def reference_rows(count: int, settings: ScanSettings) -> np.ndarray:
    """Sorted dataset rows of the density reference, drawn from ``settings.seed``."""
    return draw_rows(count, settings.reference_size, settings.seed)


def draw_rows(count: int, size: int | None, seed: int) -> np.ndarray:
    """``size`` sorted rows of ``count`` drawn from ``seed`` (all rows for None or more)."""
    if size is None or size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


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
    block: int | None = None,
) -> Density:
    """k-distance, SLOF and log-DAO of each query image against the reference images.

    The reference's own neighbourhoods (each reference image against the others) give the
    neighbours' k-distances and local dimensions that SLOF and DAO compare with. The queries
    are searched ``block`` rows at a time against the one reference index.
    """
    own = nearest(reference, reference, k, query_ids=reference_rows, bank_ids=reference_rows)
    own_kdist = k_distance(own)
    lid = local_dimension(own.distance, cap=float(images.shape[1]))
    built = build_bank(reference, ids=reference_rows)
    query_rows = np.asarray(query_rows)
    check_k(k, len(reference), bool(np.isin(query_rows, reference_rows).any()))
    kdist, slof, dao = (np.empty(len(images), dtype=np.float64) for _ in range(3))
    for part in row_blocks(len(images), block):
        found = search(built, images[part], k, query_ids=query_rows[part])
        kdist[part] = k_distance(found)
        slof[part] = kdist[part] / own_kdist[found.index].mean(axis=1)
        dao[part] = log_dao(kdist[part], found, own_kdist, lid)
    return Density(kdist, slof, dao)


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


def peers_score(
    images: np.ndarray,
    captions: np.ndarray,
    k: int,
    *,
    query_rows: np.ndarray,
    reference_rows: np.ndarray,
    block: int | None = None,
) -> np.ndarray:
    """How much worse each image fits its caption's peers' images than they fit each other.

    The peers of pair ``i`` are the ``k`` reference pairs whose captions are nearest
    ``i``'s caption (``i`` itself left out). With ``m`` the mean of their image embeddings,
    the score is ``m . m - x_i . m``: the peers' mean fit to their own centre (the mean of
    ``x_j . m`` over the peers is exactly ``m . m``) minus the image's. About zero for an
    image typical of its kind of caption, whatever that kind's spread; positive for an
    image unlike the images its caption usually comes with.
    """
    peers = Peers(images, captions, k, query_rows=query_rows, reference_rows=reference_rows)
    out = np.empty(len(images), dtype=np.float64)
    for part in row_blocks(len(images), block):
        out[part] = peers_value(np.asarray(images[part], dtype=np.float64), peers.centres(part))
    return out


def peers_value(images: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``m . m - x . m`` row by row (float64 ``images`` ``x`` and peer centres ``m``)."""
    return np.einsum("nd,nd->n", centres, centres) - np.einsum("nd,nd->n", images, centres)


class Peers:
    """Each pair's caption peers among the reference pairs, and the mean of their images."""

    def __init__(
        self,
        images: np.ndarray,
        captions: np.ndarray,
        k: int,
        *,
        query_rows: np.ndarray,
        reference_rows: np.ndarray,
    ) -> None:
        """Index the reference captions; ``query_rows`` names each row so it is not its own peer."""
        self.images, self.captions, self.k = images, captions, k
        self.query_rows = np.asarray(query_rows)
        check_k(k, len(reference_rows), bool(np.isin(self.query_rows, reference_rows).any()))
        self.reference_images = np.ascontiguousarray(images[reference_rows], dtype=np.float32)
        reference_captions = np.ascontiguousarray(captions[reference_rows], dtype=np.float32)
        self.bank = build_bank(reference_captions, ids=reference_rows)

    def centres(self, rows: slice | np.ndarray) -> np.ndarray:
        """``[len(rows), dim]`` float64: the mean image of each row's ``k`` caption peers."""
        found = search(
            self.bank, np.asarray(self.captions[rows]), self.k, query_ids=self.query_rows[rows]
        )
        return self.reference_images[found.index].astype(np.float64).mean(axis=1)

    def offsets(self, rows: slice | np.ndarray) -> np.ndarray:
        """Each row's image minus its peers' mean image (float64)."""
        return np.asarray(self.images[rows], dtype=np.float64) - self.centres(rows)


def peer_scores(
    images: np.ndarray,
    captions: np.ndarray,
    k: int,
    *,
    query_rows: np.ndarray,
    reference_rows: np.ndarray,
    fit_rows: np.ndarray | None = None,
    trim: float = 0.1,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``peers`` and ``misfit`` of every row, from one search of each row's caption peers.

    ``misfit`` is the squared Mahalanobis distance ``(r - mu)^T S^+ (r - mu)`` of each
    image's offset ``r_i = x_i - m_i`` from its caption's peers' mean image (``m_i`` as in
    :func:`peers_score`), against the mean and covariance of the offsets of ``fit_rows``
    (all rows for None), fitted by :func:`trimmed_gaussian` so that the most atypical share
    ``trim`` (the poison among them) does not set the scale: large where an image differs
    from its kind of caption's usual images in a direction clean pairs seldom differ in.
    The Gaussian is fitted first, on ``fit_rows`` (a bounded sample: its own search), then
    every block of rows is searched once for both scores; where the sample is every row, its
    offsets serve the scores too and no row is searched twice.
    """
    peers = Peers(images, captions, k, query_rows=query_rows, reference_rows=reference_rows)
    n = len(images)
    fit = np.arange(n) if fit_rows is None else np.asarray(fit_rows)
    fitted = peers.offsets(fit)
    mean, precision = trimmed_gaussian(fitted, trim)
    every_row = len(fit) == n and np.array_equal(fit, np.arange(n))  # no second search
    peer, misfit = np.empty(n), np.empty(n)
    for part in row_blocks(n, block):
        own = np.asarray(images[part], dtype=np.float64)
        if every_row:
            offsets = fitted[part]
            centres = own - offsets
        else:
            centres = peers.centres(part)
            offsets = own - centres
        peer[part] = peers_value(own, centres)
        misfit[part] = mahalanobis(offsets - mean, precision)
    return peer, misfit


def mahalanobis(centred: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``r^T P r`` for each row ``r``: the same figures for a row in any block.

    Up to float64 rounding: a BLAS may sum a product's terms in another order for another
    block height.
    """
    return np.einsum("nd,nd->n", centred @ precision, centred)


def trimmed_gaussian(
    rows: np.ndarray, trim: float, refits: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and pseudo-inverse covariance of ``rows``, the farthest share ``trim`` left out.

    Fitted on every row, then ``refits`` times again without the ``trim`` share of rows
    farthest from the last fit: a trimmed estimate in the spirit of the minimum covariance
    determinant. A poisoned minority inflates a plain covariance along its own direction and
    so hides in it; left out of the fit, it is measured against the clean pairs' spread.
    """
    keep = np.ones(len(rows), dtype=bool)
    for _ in range(refits + 1 if trim > 0 else 1):
        mean = rows[keep].mean(axis=0)
        centred = rows - mean
        covariance = centred[keep].T @ centred[keep] / max(int(keep.sum()), 1)
        precision = np.linalg.pinv(covariance, hermitian=True)
        distance = mahalanobis(centred, precision)
        keep = distance <= np.quantile(distance, 1.0 - trim)
    return mean, precision


def score_embeddings(
    images: np.ndarray,
    captions: np.ndarray,
    settings: ScanSettings | None = None,
    *,
    scratch: Path | str | None = None,
) -> dict[str, np.ndarray]:
    """Every detector's score of every pair (``DETECTORS``, higher = more suspicious).

    Args:
        images: ``[n, dim]`` L2-normalised image embeddings; a float32 memory map (what
            :meth:`.store.EmbeddingStore.load` returns) is read in place, block by block.
        captions: ``[n, dim]`` L2-normalised caption embeddings of the same pairs.
        settings: ``k``, the reference and its seed, the query block (default
            :class:`ScanSettings`).
        scratch: a folder for the all-images neighbour tables of ``targeted`` and the group
            scores (None: in memory).
    """
    settings = settings or ScanSettings()
    images, captions = as_rows(images, "image embeddings"), as_rows(captions, "captions")
    if images.shape != captions.shape:
        raise ValueError(
            f"image embeddings {images.shape} and caption embeddings {captions.shape} differ: "
            "row i of both must be pair i"
        )
    n, block = len(images), settings.block
    ref = reference_rows(n, settings)
    peer_ref = draw_rows(n, settings.peer_reference_size, settings.seed)
    for drawn, field in ((ref, "reference_size"), (peer_ref, "peer_reference_size")):
        if settings.k > len(drawn) - 1:
            raise ValueError(
                f"k={settings.k} needs a reference of more than {settings.k} rows; the dataset "
                f"gives {len(drawn)}: lower k or raise {field}"
            )
    reference = np.ascontiguousarray(images[ref])  # in memory: every block searches it
    rows = np.arange(n)
    density = density_scores(
        images, reference, settings.k, query_rows=rows, reference_rows=ref, block=block
    )
    caption_sample, seed = settings.caption_sample, settings.seed
    scores = {
        "cosine": cosine_score(images, captions, block),
        "margin": margin_score(images, captions, caption_sample, seed, block=block),
        "kdist": density.kdist,
        "slof": density.slof,
        "dao": density.dao,
    }
    scores["peers"], scores["misfit"] = peer_scores(
        images,
        captions,
        settings.k,
        query_rows=rows,
        reference_rows=peer_ref,
        fit_rows=draw_rows(n, settings.misfit_sample, seed),
        trim=settings.misfit_trim,
        block=block,
    )
    with image_neighbours(
        images,
        captions,
        settings.k,
        exact_limit=settings.exact_limit,
        seed=seed,
        block=block,
        scratch=scratch,
    ) as near:
        scores["targeted"] = targeted_from(near, settings.duplicate_quantile, block)
        for name, group in (("peers", "peer_group"), ("misfit", "misfit_group")):
            scores[group] = group_score(scores[name], near, block)
    scores["combined"] = rank_max([scores[name] for name in COMBINED])
    return {name: scores[name] for name in DETECTORS}
