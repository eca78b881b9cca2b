"""Exact neighbours: faiss agrees with a brute-force search and leaves the query's own row out."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from roclip_plugin.scan import nearest, search_index

from .data import unit


def test_nearest_matches_brute_force_and_skips_own_row() -> None:
    rng = np.random.default_rng(0)
    bank = unit(rng.normal(size=(50, 8)))
    queries = bank[[3, 7, 11]]
    found = nearest(queries, bank, 4, query_ids=np.array([3, 7, 11]), bank_ids=np.arange(50))
    sims = queries @ bank.T
    for i, row in enumerate((3, 7, 11)):
        sims[i, row] = -np.inf
        assert found.index[i].tolist() == np.argsort(-sims[i])[:4].tolist()
    assert np.all(found.index != np.array([[3], [7], [11]]))
    assert np.all(np.diff(found.similarity, axis=1) <= 1e-6)


def test_an_exact_duplicate_of_another_row_stays_a_neighbour() -> None:
    rng = np.random.default_rng(1)
    bank = unit(rng.normal(size=(20, 8)))
    bank[5] = bank[4]
    rows = np.arange(20)
    found = nearest(bank, bank, 1, query_ids=rows, bank_ids=rows)
    assert found.index[4, 0] == 5 and found.index[5, 0] == 4
    assert found.distance[4, 0] == pytest.approx(0.0, abs=1e-3)


def test_bad_inputs_are_refused() -> None:
    bank = unit(np.random.default_rng(2).normal(size=(5, 4)))
    with pytest.raises(ValueError, match="k=5 neighbours asked of a bank of 4 other rows"):
        nearest(bank, bank, 5, query_ids=np.arange(5), bank_ids=np.arange(5))
    broken = bank.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        nearest(broken, bank, 1)


def test_above_the_exact_limit_an_ivf_index_still_finds_every_duplicate() -> None:
    """IVF search (more rows than ``exact_limit``) may swap far neighbours, never a copy."""
    rng = np.random.default_rng(3)
    bank = unit(rng.normal(size=(3000, 8)))
    bank[100:110] = bank[100]  # ten copies of one image: each other's nearest neighbours
    rows = np.arange(len(bank))
    assert isinstance(search_index(bank, exact_limit=2999), faiss.IndexIVFFlat)
    assert isinstance(search_index(bank, exact_limit=3000), faiss.IndexFlatIP)
    found = nearest(bank, bank, 9, query_ids=rows, bank_ids=rows, exact_limit=1000)
    for row in range(100, 110):
        assert set(found.index[row]) == set(range(100, 110)) - {row}
    exact = nearest(bank, bank, 9, query_ids=rows, bank_ids=rows)
    agree = np.mean(
        [len(set(a) & set(b)) / 9 for a, b in zip(found.index, exact.index, strict=True)]
    )
    assert agree > 0.9
