"""Ranks, AUROC and precision at k: how a scan's scores are combined and judged.

Kept to numpy (the core's dependencies) rather than scikit-learn; the tests check the AUROC
against scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (what Mann-Whitney's U counts)."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - (counts - 1) / 2.0)[inverse]).astype(np.float64)


def rank_mean(scores: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of each score's ranks scaled to (0, 1]: scores of any scale combined fairly."""
    if not scores:
        raise ValueError("rank_mean needs at least one score")
    n = len(scores[0])
    return np.mean([average_ranks(s) / n for s in scores], axis=0)


def rank_max(scores: Sequence[np.ndarray]) -> np.ndarray:
    """The highest of each score's ranks scaled to (0, 1]: suspicious when *any* score says so.

    One minus a scaled rank is the row's empirical p-value under that score, so this is the
    smallest p-value over the scores. Each attack is caught by one score and looks ordinary
    to the others; a mean would halve its signal (a backdoor at the top of ``dao`` but in
    the middle of ``targeted`` lands among thousands of clean rows), the maximum keeps it.
    """
    if not scores:
        raise ValueError("rank_max needs at least one score")
    n = len(scores[0])
    return np.max([average_ranks(s) / n for s in scores], axis=0)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` rows (None: one class only).

    The probability that a random positive scores above a random negative, ties counting
    half: Mann-Whitney's U over the two counts.
    """
    positive = np.asarray(positive, dtype=bool)
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = average_ranks(scores)
    u = ranks[positive].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))


def top_rows(scores: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` highest-scoring rows, highest first; ties to the lower row."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return order[:count]


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int | None = None) -> float | None:
    """Share of positives among the ``k`` top-scored rows (default k: the positives' count)."""
    positive = np.asarray(positive, dtype=bool)
    k = int(positive.sum()) if k is None else k
    if k < 1:
        return None
    return float(positive[top_rows(scores, k)].mean())
