"""Ranks, AUROC and precision at k on known cases, AUROC against scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin.scan import auroc, average_ranks, precision_at_k, rank_max, rank_mean, top_rows


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_known_cases() -> None:
    positive = np.array([0, 0, 1, 1], dtype=bool)
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), positive) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), positive) == 0.0
    assert auroc(np.ones(4), positive) == 0.5
    assert auroc(np.array([0.1, 0.9, 0.8, 0.2]), positive) == 0.5
    assert auroc(np.ones(3), np.zeros(3, dtype=bool)) is None


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=2, max_size=40),
    st.lists(st.booleans(), min_size=2, max_size=40),
)
def test_auroc_matches_scikit_learn(values: list[int], flags: list[bool]) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    n = min(len(values), len(flags))
    scores, positive = np.array(values[:n], dtype=float), np.array(flags[:n])
    if positive.all() or not positive.any():
        assert auroc(scores, positive) is None
        return
    assert auroc(scores, positive) == pytest.approx(metrics.roc_auc_score(positive, scores))


def test_precision_at_k_and_ties_to_the_lower_row() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    assert top_rows(scores, 3).tolist() == [1, 0, 2]
    positive = np.array([False, True, False, True])
    assert precision_at_k(scores, positive) == 0.5  # k = 2: rows 1 and 0
    assert precision_at_k(scores, positive, k=4) == 0.5
    assert precision_at_k(scores, np.zeros(4, dtype=bool)) is None


def test_rank_mean_ignores_scale() -> None:
    a = np.array([1.0, 2.0, 3.0])
    combined = rank_mean([a, 1000 * a[::-1]])
    assert np.allclose(combined, combined[0])
    assert rank_mean([a, a * 1e6]).tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_rank_max_keeps_a_row_that_only_one_score_ranks_first() -> None:
    """Row 0 tops score a and sits mid-table on b: the maximum keeps it first, a mean does not."""
    a = np.array([9.0, 1.0, 2.0, 3.0, 4.0])
    b = np.array([1.0, 5.0, 2.0, 8.0, 3.0]) * 1000
    assert top_rows(rank_max([a, b]), 2).tolist() == [0, 3]
    assert rank_max([a, b])[0] == 1.0
    assert rank_mean([a, b]).argmax() != 0
    with pytest.raises(ValueError, match="at least one score"):
        rank_max([])
