"""The sample ids a step hands to the per-sample history: a CSV step's dataset rows, a
WebDataset step's hashed ``__key__`` values (its suspicious rows keep key and caption), and the
keyed batches that take the keys off each WebDataset batch in order.
"""

from __future__ import annotations

import pytest

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn.datasets")


def test_the_csv_rows_of_a_step_become_its_sample_ids() -> None:
    """The loss's pre-hook hands the step's dataset rows to the per-sample history."""
    import torch
    from roclip_openclip.patches import EpochReport

    class _Loss:
        call_in_step = 0
        pending_ids = None

    report = EpochReport(margin_threshold=0.2)
    report.indices.extend([7, 3, 9, 1, 4])
    loss = _Loss()
    report.before_loss(loss, (), {"image_features": torch.zeros(3, 4)})
    assert loss.pending_ids.tolist() == [7, 3, 9]
    report.indices.clear()  # a data path with no rows (WebDataset): no ids are made up
    loss.pending_ids = None
    report.before_loss(loss, (), {"image_features": torch.zeros(2, 4)})
    assert loss.pending_ids is None


def test_the_webdataset_keys_of_a_step_become_its_sample_ids() -> None:
    """A WebDataset step's ``__key__`` values are hashed to the history's ids, and the
    suspicious rows keep key and caption (its row index is unknown: -1)."""
    import torch
    from roclip_openclip.patches import EpochReport

    from roclip_plugin.loss import MatchStats
    from roclip_plugin.risk import stable_ids
    from roclip_plugin.stats import SuspiciousRow

    class _Loss:
        call_in_step = 0
        pending_ids = None

    report = EpochReport(margin_threshold=0.2)
    report.indices.extend([("a/001", "a cat"), ("a/002", "a dog"), ("b/001", "a car")])
    loss = _Loss()
    report.before_loss(loss, (), {"image_features": torch.zeros(2, 4)})
    assert loss.pending_ids.tolist() == stable_ids(["a/001", "a/002"]).tolist()
    margins = torch.tensor([0.25, 0.5])
    zeros = torch.zeros(2, dtype=torch.long)
    report.stats.roclip_after_match(
        MatchStats(0, 0, 4, 8, 0.0, 0.0, margins, zeros, ids=loss.pending_ids)
    )
    assert report.top_rows() == [
        SuspiciousRow(-1, "a/002", "a dog", 0.5),
        SuspiciousRow(-1, "a/001", "a cat", 0.25),
    ]


def test_keyed_batches_take_keys_off_each_batch_in_order() -> None:
    from collections import deque

    from roclip_openclip.patches import KeyedBatches

    class _Loader(list):
        num_batches = 2

    loader = _Loader([("i0", "t0", ["k0", "k1"], ["c0", "c1"]), ("i1", "t1", ["k2"], ["c2"])])
    queue: deque = deque()
    batches = KeyedBatches(loader, queue)
    assert batches.num_batches == 2 and len(batches) == 2
    seen = []
    for images, texts in batches:
        seen.append((images, texts, list(queue)))
    assert seen[0] == ("i0", "t0", [("k0", "c0"), ("k1", "c1")])
    assert seen[1][2][-1] == ("k2", "c2")
