"""Each detector's mechanics on constructed embeddings: what it ranks first, and what not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin.scan import (
    DETECTORS,
    ScanSettings,
    auroc,
    density_scores,
    score_embeddings,
    top_rows,
)
from roclip_plugin.scan.detectors import (
    cosine_score,
    local_dimension,
    margin_score,
    peer_scores,
    peers_score,
)

from .data import planted, unit


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def scores(data):
    return score_embeddings(data.images, data.captions, ScanSettings(k=16, reference_size=None))


def test_every_detector_scores_every_pair(data, scores) -> None:
    assert set(scores) == set(DETECTORS)
    for name, values in scores.items():
        assert values.shape == (len(data.images),), name
        assert np.isfinite(values).all(), name


@pytest.mark.parametrize("detector", ["kdist", "dao"])
def test_a_dense_planted_cluster_is_ranked_first_by_density(data, scores, detector) -> None:
    count = int(data.backdoor.sum())
    assert set(top_rows(scores[detector], count)) == set(np.flatnonzero(data.backdoor))
    assert auroc(scores[detector], data.backdoor) == 1.0


def test_slof_ranks_the_cluster_high_but_its_neighbours_share_its_sparsity(data, scores) -> None:
    """The cluster's own members are its nearest reference images: their k-distances are as
    large as its own, so SLOF's ratio is diluted; DAO's dimension correction is not."""
    assert 0.85 < auroc(scores["slof"], data.backdoor) < auroc(scores["dao"], data.backdoor)


def test_the_targeted_score_ranks_the_repeated_images_first(data, scores) -> None:
    count = int(data.targeted.sum())
    top = top_rows(scores["targeted"], count)
    assert set(top) == set(np.flatnonzero(data.targeted))
    clean = ~(data.backdoor | data.targeted)
    for kind in (data.targeted, data.backdoor):
        assert auroc(scores["combined"][clean | kind], kind[clean | kind]) > 0.95


def test_mismatched_captions_score_high_on_cosine_and_margin(data, scores) -> None:
    clean = ~(data.backdoor | data.targeted)
    for detector in ("cosine", "margin"):
        poisoned_vs_clean = data.targeted[clean | data.targeted]
        assert auroc(scores[detector][clean | data.targeted], poisoned_vs_clean) > 0.95


def learned_backdoor(seed: int = 9, clean: int = 500, backdoor: int = 10, dim: int = 16):
    """A backdoor the model has learned: each poisoned image keeps its own class's content
    but is pulled half-way to the target class its caption names, so its caption fits it
    about as well as a clean caption fits a loose class's image."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(4, dim)))
    label = rng.integers(4, size=clean)
    spread = np.where(label == 3, 0.2, 0.08)[:, None]  # one loose class, three tight ones
    images = [centres[label] + spread * rng.normal(size=(clean, dim))]
    captions = [centres[label] + 0.05 * rng.normal(size=(clean, dim))]
    source = rng.integers(1, 4, size=backdoor)
    images.append(centres[0] + 0.8 * centres[source] + 0.05 * rng.normal(size=(backdoor, dim)))
    captions.append(centres[[0] * backdoor] + 0.05 * rng.normal(size=(backdoor, dim)))
    poisoned = np.arange(clean + backdoor) >= clean
    return unit(np.concatenate(images)), unit(np.concatenate(captions)), poisoned


def test_peers_ranks_images_unlike_their_captions_usual_images_first() -> None:
    """The loose class's typical images fit their captions worse than the poisoned ones fit
    theirs (``cosine`` ranks them alike), but they fit their own caption's images as well as
    those images fit each other, so ``peers`` ranks the poisoned pairs above them."""
    images, captions, poisoned = learned_backdoor()
    rows = np.arange(len(images))
    peers = peers_score(images, captions, 8, query_rows=rows, reference_rows=rows)
    cosine = score_embeddings(images, captions, ScanSettings(k=8, reference_size=None))["cosine"]
    assert auroc(peers, poisoned) > 0.97
    assert auroc(peers, poisoned) > auroc(cosine, poisoned) + 0.05


def test_peers_is_the_centre_of_the_nearest_captions_images_against_the_own_image() -> None:
    """Brute force: the k reference captions nearest each caption (its own row left out),
    the mean ``m`` of their images, and ``m . m - x . m``."""
    rng = np.random.default_rng(10)
    images, captions = unit(rng.normal(size=(50, 6))), unit(rng.normal(size=(50, 6)))
    reference = np.arange(0, 50, 2)  # every other row: odd rows are not in the reference
    similarity = captions @ captions[reference].T
    similarity[reference, np.arange(len(reference))] = -np.inf  # a row is not its own peer
    peers = np.argsort(-similarity, axis=1, kind="stable")[:, :5]
    centre = images[reference][peers].astype(np.float64).mean(axis=1)
    expected = (centre * centre).sum(1) - (images * centre).sum(1)
    found = peers_score(images, captions, 5, query_rows=np.arange(50), reference_rows=reference)
    assert np.allclose(found, expected, atol=1e-5)


def quiet_backdoor(seed: int = 11, clean: int = 600, backdoor: int = 20, dim: int = 16):
    """A backdoor that moves its images along a direction clean images hardly vary in.

    Clean images spread widely in most dimensions and barely in the last four; the
    backdoored images are typical images of the class their caption names, plus a small
    offset (the trigger) along one quiet dimension: no farther from their caption or their
    caption's usual images than a clean image is, only in an unusual direction.
    """
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:4]
    label = rng.integers(4, size=clean)
    spread = np.r_[np.full(dim - 4, 0.08), np.full(4, 0.004)]
    trigger = np.zeros(dim)
    trigger[-2] = 0.08
    images = [centres[label] + spread * rng.normal(size=(clean, dim))]
    images.append(centres[0] + spread * rng.normal(size=(backdoor, dim)) + trigger)
    captions = [centres[label] + 0.03 * rng.normal(size=(clean, dim))]
    captions.append(centres[[0] * backdoor] + 0.03 * rng.normal(size=(backdoor, dim)))
    poisoned = np.arange(clean + backdoor) >= clean
    return unit(np.concatenate(images)), unit(np.concatenate(captions)), poisoned


def test_misfit_finds_an_offset_in_a_direction_clean_pairs_do_not_vary_in() -> None:
    images, captions, poisoned = quiet_backdoor()
    rows = np.arange(len(images))
    misfit = peer_scores(images, captions, 8, query_rows=rows, reference_rows=rows)[1]
    peers = peers_score(images, captions, 8, query_rows=rows, reference_rows=rows)
    assert auroc(misfit, poisoned) > 0.99
    assert auroc(peers, poisoned) < 0.6  # the offsets' lengths do not tell them apart
    assert auroc(cosine_score(images, captions), poisoned) < 0.6


def test_trimming_keeps_the_poison_out_of_the_spread_it_is_measured_against() -> None:
    """The 20 backdoored pairs (3% of all) widen a plain covariance along the trigger; fitted
    without the most atypical tenth, the clean spread is what they are measured against."""
    images, captions, poisoned = quiet_backdoor()
    rows = np.arange(len(images))
    plain, trimmed = (
        peer_scores(images, captions, 8, query_rows=rows, reference_rows=rows, trim=trim)[1]
        for trim in (0.0, 0.1)
    )
    assert auroc(trimmed, poisoned) > auroc(plain, poisoned)
    ratio = {
        name: s[poisoned].mean() / np.median(s[~poisoned])
        for name, s in (("plain", plain), ("trimmed", trimmed))
    }
    assert ratio["trimmed"] > 2 * ratio["plain"]


def test_a_fit_on_every_row_reuses_its_offsets_for_the_scores() -> None:
    """Fitted on every row, the fit's own offsets give the scores (one search); the same rows
    in another order are searched again per block: the figures agree."""
    rng = np.random.default_rng(13)
    images, captions = unit(rng.normal(size=(120, 6))), unit(rng.normal(size=(120, 6)))
    rows = np.arange(120)
    once = peer_scores(images, captions, 5, query_rows=rows, reference_rows=rows[::2], block=50)
    twice = peer_scores(
        images,
        captions,
        5,
        query_rows=rows,
        reference_rows=rows[::2],
        fit_rows=rows[::-1],
        block=50,
    )
    for a, b in zip(once, twice, strict=True):
        assert np.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_misfit_is_the_mahalanobis_distance_of_the_offset_from_the_peers_mean_image() -> None:
    """Brute force, untrimmed: offsets ``x - m`` of the fit rows, their mean and (population)
    covariance, and ``(r - mu)^T S^+ (r - mu)`` for every row."""
    rng = np.random.default_rng(12)
    images, captions = unit(rng.normal(size=(80, 5))), unit(rng.normal(size=(80, 5)))
    reference, fit = np.arange(0, 80, 2), np.arange(0, 80, 3)
    similarity = captions @ captions[reference].T
    similarity[reference, np.arange(len(reference))] = -np.inf  # a row is not its own peer
    peers = np.argsort(-similarity, axis=1, kind="stable")[:, :6]
    offsets = images - images[reference][peers].astype(np.float64).mean(axis=1)
    mean = offsets[fit].mean(axis=0)
    covariance = np.cov(offsets[fit].T, bias=True)
    centred = offsets - mean
    expected = np.einsum("nd,de,ne->n", centred, np.linalg.inv(covariance), centred)
    found = peer_scores(
        images,
        captions,
        6,
        query_rows=np.arange(80),
        reference_rows=reference,
        fit_rows=fit,
        trim=0.0,
    )[1]
    assert np.allclose(found, expected, rtol=1e-4, atol=1e-4)


def test_a_cluster_larger_than_k_hides_in_a_full_reference_but_not_in_a_small_one() -> None:
    """The local-density paper's limit: with more poisons than k in the reference, the cluster
    looks normal; a reference sample holding few of them finds it again."""
    big = planted(seed=3, clean=1200, backdoor=60, targets=0)
    full = score_embeddings(big.images, big.captions, ScanSettings(reference_size=None))
    small = score_embeddings(big.images, big.captions, ScanSettings(reference_size=200, seed=1))
    assert auroc(full["kdist"], big.backdoor) < 0.2
    assert auroc(small["kdist"], big.backdoor) > 0.99
    assert auroc(small["dao"], big.backdoor) > 0.99


@settings(max_examples=8, deadline=None)
@given(st.randoms(use_true_random=False))
def test_scores_do_not_depend_on_row_order(random) -> None:
    data = planted(seed=4, clean=150, backdoor=6, targets=1, copies=5)
    order = np.array(random.sample(range(len(data.images)), len(data.images)))
    setting = ScanSettings(k=8, reference_size=None)
    base = score_embeddings(data.images, data.captions, setting)
    moved = score_embeddings(data.images[order], data.captions[order], setting)
    for name in DETECTORS:  # float32 search: near-ties at the k-th neighbour may swap
        assert np.allclose(moved[name], base[name][order], rtol=1e-4, atol=1e-4), name


def test_dao_stays_finite_where_the_plain_ratio_overflows() -> None:
    rng = np.random.default_rng(5)
    dim = 400  # local dimensions up to 400: ratio ** lid leaves float64's range
    reference = unit(rng.normal(size=(60, dim)))
    far = unit(rng.normal(size=(1, dim)))
    rows = np.arange(60)
    found = density_scores(far, reference, 8, query_rows=np.array([-1]), reference_rows=rows)
    assert np.isfinite(found.dao).all()


def test_local_dimension_of_duplicates_is_capped() -> None:
    assert local_dimension(np.zeros((1, 4)), cap=64.0).tolist() == [64.0]
    spread = np.array([[1.0, 2.0, 4.0, 8.0]])
    assert local_dimension(spread, cap=64.0)[0] == pytest.approx(4 / (6 * np.log(2)))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", 0, "k must be an integer >= 1"),
        ("reference_size", 1, "reference_size must be None or an integer >= 2"),
        ("peer_reference_size", 1, "peer_reference_size must be None or an integer >= 2"),
        ("misfit_sample", 0, "misfit_sample must be None or an integer >= 2"),
        ("misfit_trim", 0.5, "misfit_trim must be in"),
        ("misfit_trim", -0.1, "misfit_trim must be in"),
        ("duplicate_quantile", 1.0, "duplicate_quantile must be in"),
        ("seed", -1, "seed must be a non-negative integer"),
        ("caption_sample", 1, "caption_sample must be None or an integer >= 2"),
        ("exact_limit", True, "exact_limit must be None or an integer >= 2"),
        ("block", 0, "block must be None or an integer >= 1"),
    ],
)
def test_bad_settings_name_the_field(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        ScanSettings(**{field: value})


def test_a_k_beyond_the_reference_and_mismatched_shapes_are_refused(data) -> None:
    with pytest.raises(ValueError, match="lower k or raise reference_size"):
        score_embeddings(data.images, data.captions, ScanSettings(k=16, reference_size=10))
    with pytest.raises(ValueError, match="lower k or raise peer_reference_size"):
        score_embeddings(data.images, data.captions, ScanSettings(k=16, peer_reference_size=12))
    with pytest.raises(ValueError, match="row i of both must be pair i"):
        score_embeddings(data.images, data.captions[:-1])


def test_the_margin_over_distinct_captions_equals_the_all_rows_search() -> None:
    """A caption shared with another row stays a candidate; one held by the row alone does not."""
    rng = np.random.default_rng(6)
    images = unit(rng.normal(size=(40, 8)))
    captions = unit(rng.normal(size=(40, 8)))
    captions[10:20] = captions[10]  # a template on ten rows
    captions[25] = images[25]  # a caption that fits only its own image
    brute = images @ captions.T
    np.fill_diagonal(brute, -np.inf)
    expected = brute.max(axis=1) - np.einsum("nd,nd->n", images, captions)
    assert np.allclose(margin_score(images, captions), expected, atol=1e-6)
    margins = margin_score(images, captions)
    assert margins[12] >= 0.0  # its template on row 13 is another row's caption
    assert margins[25] < 0.0  # its own caption, on no other row, is not a candidate
    sampled = margin_score(images, captions, sample=5, seed=1)
    assert np.all(sampled <= expected + 1e-6)  # fewer candidates: a lower bound


@pytest.mark.parametrize(
    "base",
    [
        ScanSettings(k=8, reference_size=300, seed=1),
        ScanSettings(k=8, reference_size=None, exact_limit=200, caption_sample=None),
        ScanSettings(k=8, reference_size=300, caption_sample=40),
    ],
    ids=["exact", "ivf", "caption-sample"],
)
def test_scores_in_blocks_equal_the_scores_of_all_rows_at_once(base, tmp_path) -> None:
    """Bounded memory changes no score: each row's figures come from the same searches.

    Equal up to float64 rounding, not bit for bit: a BLAS may pick another kernel for another
    block height (this CPU's OpenBLAS sums ``misfit``'s products in another order for 37 rows
    than for 742, a difference of 1e-14), and no BLAS promises otherwise.
    """
    data = planted(seed=7, clean=700, backdoor=15, targets=2, copies=12)
    captions = data.captions.copy()
    captions[100:160] = captions[100]  # a template: the margin's distinct captions matter
    whole = score_embeddings(data.images, captions, replace(base, block=None))
    blocked = score_embeddings(
        data.images, captions, replace(base, block=37), scratch=tmp_path / "scratch"
    )
    for name in DETECTORS:
        np.testing.assert_allclose(blocked[name], whole[name], rtol=1e-12, atol=1e-12, err_msg=name)
    assert list((tmp_path / "scratch").iterdir()) == []  # the spilled tables are removed


def test_distinct_rows_survive_a_hash_collision(monkeypatch) -> None:
    from roclip_plugin.scan import distinct

    rng = np.random.default_rng(8)
    rows = unit(rng.normal(size=(30, 4)))
    rows[10:15] = rows[10]
    expected = distinct.distinct_rows(rows, block=7)
    monkeypatch.setattr(distinct, "row_hashes", lambda r, b: np.zeros(len(r), np.uint64))
    first, counts = distinct.distinct_rows(rows, block=7)  # every row "collides"
    pairs = sorted(zip(first.tolist(), counts.tolist(), strict=True))
    assert pairs == sorted(zip(expected[0].tolist(), expected[1].tolist(), strict=True))
    assert len(first) == 26 and counts.max() == 5
    first, counts, group = distinct.row_groups(rows, block=7)  # the fallback's groups too
    assert np.array_equal(rows[first[group]], rows)
    assert len(set(group[10:15].tolist())) == 1 and len(set(group.tolist())) == 26
