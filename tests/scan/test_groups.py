"""The scores read over each image's nearest images: the shared search and the group scores."""

from __future__ import annotations

import numpy as np
import pytest

from roclip_plugin.scan import ScanSettings, auroc, score_embeddings
from roclip_plugin.scan.detectors import COMBINED
from roclip_plugin.scan.groups import group_score, image_neighbours
from roclip_plugin.scan.ranks import rank_max

from .data import planted, unit


def brute_neighbours(images: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` most cosine-similar other rows, by a full similarity matrix."""
    similarity = images.astype(np.float64) @ images.T.astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def test_the_search_finds_each_rows_nearest_other_images() -> None:
    rng = np.random.default_rng(0)
    images, captions = unit(rng.normal(size=(90, 6))), unit(rng.normal(size=(90, 6)))
    with image_neighbours(images, captions, 5) as near:
        assert np.array_equal(
            np.sort(near.index, axis=1), np.sort(brute_neighbours(images, 5), axis=1)
        )
        expected = np.einsum("nd,nkd->nk", captions, captions[near.index], dtype=np.float64)
        assert np.allclose(near.agreement, np.clip(expected, 0, None), atol=1e-6)
        assert (near.index != np.arange(90)[:, None]).all()  # never its own row


def test_the_copy_ids_are_hashed_only_when_a_group_score_asks(monkeypatch) -> None:
    """The targeted score alone never needs them: it must not pay for hashing every row."""
    import roclip_plugin.scan.groups as groups

    calls: list[int] = []
    real = groups.row_groups

    def counting(rows: np.ndarray, block: int | None = None):
        calls.append(len(rows))
        return real(rows, block)

    monkeypatch.setattr(groups, "row_groups", counting)
    rng = np.random.default_rng(2)
    images = unit(rng.normal(size=(40, 5)))
    images[30:] = images[0]  # ten copies of row 0
    captions = unit(rng.normal(size=(40, 5)))
    groups.targeted_score(images, captions, 4, 0.1)
    assert calls == []
    with image_neighbours(images, captions, 4) as near:
        copies = near.copies
        assert calls == [40] and near.copies is copies  # hashed once, then kept
    assert (copies[30:] == copies[0]).all() and copies[0] not in copies[1:30]
    assert len(set(copies[1:30].tolist())) == 29


def test_a_group_score_is_the_own_score_plus_the_neighbours_mean() -> None:
    rng = np.random.default_rng(1)
    images, captions = unit(rng.normal(size=(70, 5))), unit(rng.normal(size=(70, 5)))
    values = rng.normal(size=70)
    index = brute_neighbours(images, 4)
    with image_neighbours(images, captions, 4, block=9) as near:
        found = group_score(values, near, block=9)
    assert np.allclose(found, values + values[index].mean(axis=1))


def test_a_group_score_needs_a_score_for_every_row() -> None:
    rng = np.random.default_rng(2)
    images = unit(rng.normal(size=(20, 4)))
    with image_neighbours(images, images, 3) as near, pytest.raises(ValueError, match="every row"):
        group_score(np.zeros(19), near)


def test_a_group_of_mild_scores_outranks_lone_higher_ones() -> None:
    """30 images in one tight cluster (a learned backdoor's copies) each score 1; 30 lone
    images among the clean ones score 1.5 each (clean pairs that look odd alone). Alone the
    lone ones come first; with their neighbours' scores the cluster does."""
    rng = np.random.default_rng(3)
    dim = 16
    clean = unit(rng.normal(size=(600, dim)))
    spot = unit(rng.normal(size=(1, dim)))
    cluster = unit(spot + 0.02 * rng.normal(size=(30, dim)))
    images = np.concatenate([clean, cluster])
    values = np.concatenate([0.1 * rng.normal(size=600), np.ones(30)])
    # lone, and away from the cluster (clean pairs next to it share its neighbours' scores)
    lone = rng.choice(np.flatnonzero(clean @ spot[0] < 0), 30, replace=False)
    values[lone] = 1.5
    grouped = np.arange(630) >= 600
    with image_neighbours(images, images, 16) as near:
        group = group_score(values, near)
    pair = grouped.copy()
    pair[lone] = True
    assert auroc(values[pair], grouped[pair]) == 0.0  # alone, every lone pair comes first
    assert auroc(group[pair], grouped[pair]) == 1.0  # as a group, the cluster does
    assert set(np.argsort(-group)[:30]) == set(np.flatnonzero(grouped))


def test_combined_is_the_highest_rank_of_the_group_scores() -> None:
    data = planted(seed=5)
    scores = score_embeddings(data.images, data.captions, ScanSettings(k=8, reference_size=None))
    assert COMBINED == ("peer_group", "misfit_group")
    assert np.array_equal(scores["combined"], rank_max([scores[name] for name in COMBINED]))
    clean = ~(data.backdoor | data.targeted)
    for kind in (data.backdoor, data.targeted):
        assert auroc(scores["combined"][clean | kind], kind[clean | kind]) > 0.95


def test_duplicates_cut_at_the_kth_place_count_by_their_mean_in_any_row_order() -> None:
    """Row 0's two nearest images are distinct; the next five are one image repeated (a
    targeted attack's copies) with different scores, and k = 4 takes two of them: which two
    turns on row order, the score does not."""
    dim = 4
    query = np.array([[1.0, 0.0, 0.0, 0.0]])
    near_two = unit(np.array([[1.0, 0.05, 0.0, 0.0], [1.0, 0.0, 0.07, 0.0]]))
    copies = np.repeat(unit(np.array([[1.0, 0.0, 0.0, 0.3]])), 5, axis=0)
    far = unit(np.random.default_rng(4).normal(size=(20, dim)) - 3 * query)
    images = unit(np.concatenate([query, near_two, copies, far]))
    values = np.concatenate([[0.5, 0.1, 0.2], [1.0, 2.0, 3.0, 4.0, 5.0], np.zeros(20)])
    expected = 0.5 + (0.1 + 0.2 + 2 * 3.0) / 4
    for order in (np.arange(28), np.r_[0, 1, 2, 7, 6, 5, 4, 3, 8:28]):
        with image_neighbours(images[order], images[order], 4) as near:
            found = group_score(values[order], near)
        assert found[0] == pytest.approx(expected)
