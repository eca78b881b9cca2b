"""The statistics room: the bounded top-k against a brute-force sort, the suspicious-rows CSV
written and read back (and its older form read), the collector's counts keyed by sample ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin.contrastive import MatchStats, RiskStats
from roclip_plugin.stats import (
    MatchStatsCollector,
    SuspiciousRow,
    TopRows,
    read_suspicious_rows,
    suspicious_epoch,
    suspicious_name,
    top_suspicious,
    write_suspicious,
)

# a few distinct values so ties and repeated ids are common
_scores = st.lists(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0]), min_size=0, max_size=12)


def _brute_force(batches: list[tuple[list[float], list[int] | None]], k: int) -> list[tuple]:
    """First ``k`` distinct known ids of a stable descending sort of every entry."""
    entries = []
    for scores, ids in batches:
        for j, s in enumerate(scores):
            entries.append((s, None if ids is None else ids[j], (len(entries),)))
    order = sorted(range(len(entries)), key=lambda i: -entries[i][0])  # sorted() is stable
    out, seen = [], set()
    for i in order:
        score, sample, payload = entries[i]
        if sample is not None and sample in seen:
            continue
        if sample is not None:
            seen.add(sample)
        out.append((score, sample, payload))
    return out[:k]


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(
        st.tuples(_scores, st.booleans()).map(
            lambda t: (t[0], [int(abs(s * 4)) % 3 for s in t[0]] if t[1] else None)
        ),
        max_size=6,
    ),
    k=st.integers(0, 8),
)
def test_top_rows_is_a_brute_force_sort_kept_bounded(batches, k) -> None:
    top, count = TopRows(k), 0
    for scores, ids in batches:
        payload = [(count + j,) for j in range(len(scores))]
        count += len(scores)
        top.add(
            torch.tensor(scores, dtype=torch.float32),
            None if ids is None else torch.tensor(ids, dtype=torch.long),
            payload,
        )
        assert len(top) <= k
    assert top.ranked() == _brute_force(batches, k)


def test_top_rows_keeps_the_best_entry_of_a_repeated_id() -> None:
    top = TopRows(2)
    top.add(torch.tensor([0.1, 0.9]), torch.tensor([7, 8]), ["a", "b"])
    top.add(torch.tensor([0.5, 0.2]), torch.tensor([7, 9]), ["c", "d"])
    assert top.ranked() == [(pytest.approx(0.9), 8, "b"), (pytest.approx(0.5), 7, "c")]


def test_suspicious_rows_round_trip(tmp_path: Path) -> None:
    rows = [
        SuspiciousRow(3, "", "a cat, on a mat", 0.5),
        SuspiciousRow(-1, "shard-000/0007", 'say "hi"', -0.25),
    ]
    path = write_suspicious(tmp_path / suspicious_name(4), rows)
    assert path.read_text().splitlines()[0] == "index,key,caption,margin"
    assert read_suspicious_rows(path) == rows
    assert suspicious_epoch(path) == 4 and suspicious_epoch("other.csv") is None


def test_the_older_file_without_keys_is_read(tmp_path: Path) -> None:
    path = tmp_path / "suspicious_epoch_1.csv"
    path.write_text("index,caption,margin\n5,a dog,0.300000\n2,a cat,0.100000\n")
    assert read_suspicious_rows(path) == [
        SuspiciousRow(5, "", "a dog", 0.3),
        SuspiciousRow(2, "", "a cat", 0.1),
    ]


@pytest.mark.parametrize(
    ("text", "needle"),
    [("row,margin\n1,0.5\n", "no 'index' column"), ("index,margin\nx,0.5\n", "not a number")],
)
def test_a_bad_file_is_refused_by_name(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle) as err:
        read_suspicious_rows(path)
    assert str(path) in str(err.value)


def test_ranks_are_merged_by_id_ties_to_the_earlier_rank() -> None:
    rank0 = [SuspiciousRow(1, "", "x", 0.5), SuspiciousRow(-1, "k", "y", 0.2)]
    rank1 = [SuspiciousRow(2, "", "z", 0.5), SuspiciousRow(-1, "k", "y", 0.4)]
    merged = top_suspicious([rank0, rank1], 10)
    assert merged == [rank0[0], rank1[0], rank1[1]]


def _match(margins: list[float], ids: list[int] | None, step: int = 0) -> MatchStats:
    m = torch.tensor(margins)
    return MatchStats(
        0,
        step,
        4,
        8,
        0.5,
        0.25,
        m,
        torch.zeros(len(m), dtype=torch.long),
        None if ids is None else torch.tensor(ids),
    )


def _risk(risk: list[float], risky: list[bool], ids: list[int], action: str) -> RiskStats:
    return RiskStats(0, 0, torch.tensor(ids), torch.tensor(risk), torch.tensor(risky), action)


def test_the_collector_keeps_ids_and_counts_against_the_manifest() -> None:
    poisoned = torch.tensor([False, True, False, True])
    stats = MatchStatsCollector(0.3, keep=3, poisoned=poisoned)
    stats.roclip_after_match(_match([0.1, 0.4, 0.35], [0, 1, 2]))
    assert stats.above_margin == 2 and stats.suspicious == 2
    assert [i for _, i, _ in stats.ranked()] == [1, 2, 0]  # margins rank without a split
    stats.roclip_after_risk(_risk([0.9, 0.1, 0.8], [True, False, True], [3, 0, 2], "drop"))
    stats.roclip_after_risk(_risk([0.2, 0.7], [False, True], [1, 3], "match"))
    assert (stats.risk.steps, stats.risk.risky, stats.risk.caught, stats.risk.poisoned) == (
        2,
        3,
        2,
        3,
    )
    assert stats.risk.precision == pytest.approx(2 / 3)
    assert stats.risk.recall == pytest.approx(2 / 3)
    assert stats.suspicious == 2 + 3 - 1  # a matched step's risky pairs count by margin
    assert [i for _, i, _ in stats.ranked()] == [3, 2, 1]  # the split's risk ranks
    rows = stats.suspicious_rows(lambda i, _: (i, "", f"c{i}"))
    assert rows[0] == SuspiciousRow(3, "", "c3", pytest.approx(0.9))


def test_the_summary_is_the_epoch_s_means_and_reset_forgets() -> None:
    stats = MatchStatsCollector(0.3)
    stats.roclip_after_match(_match([0.1, 0.4], None))
    stats.roclip_after_match(_match([0.5], None, step=1))
    summary = stats.summary()
    assert (summary.matching_steps, summary.samples, summary.suspicious) == (2, 3, 2)
    assert summary.matched_similarity == 0.5 and len(stats.margins) == 0  # keep=0: no rows
    stats.reset()
    assert stats.summary().matching_steps == 0
