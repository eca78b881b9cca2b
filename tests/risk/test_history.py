"""The per-sample history: stable ids, the moving average, bounded slots, exact state."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin.risk import BYTES_PER_SLOT, HistoryTable, stable_id, stable_ids


def test_row_indices_are_their_own_ids_and_keys_hash_to_63_bits() -> None:
    assert stable_id(7) == 7
    key_id = stable_id("shard-000012/sample-00042")
    assert 0 <= key_id < 2**63
    assert stable_id("shard-000012/sample-00042") == key_id
    assert stable_id("shard-000012/sample-00043") != key_id
    assert stable_ids(torch.tensor([3, 1])).tolist() == [3, 1]
    assert stable_ids(["a", "b"]).tolist() == [stable_id("a"), stable_id("b")]


def test_string_ids_do_not_change_with_the_process_hash_seed() -> None:
    code = "from roclip_plugin.risk import stable_id; print(stable_id('webdataset-key'))"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        outputs.add(run.stdout.strip())
    assert outputs == {str(stable_id("webdataset-key"))}


@pytest.mark.parametrize("bad", [-1, True, torch.tensor([0.5]), torch.tensor([-2])])
def test_bad_ids_are_refused_naming_what_to_give(bad: object) -> None:
    with pytest.raises((ValueError, TypeError), match="sample id"):
        stable_ids(bad) if isinstance(bad, torch.Tensor) else stable_id(bad)  # type: ignore[arg-type]


def test_first_visit_is_the_score_then_a_moving_average() -> None:
    table = HistoryTable(slots=10, decay=0.5)
    ids = torch.tensor([1, 4])
    assert torch.isnan(table.memory(ids, torch.device("cpu"))).all()
    first = table.update(ids, torch.tensor([2.0, -1.0]))
    assert first.tolist() == [2.0, -1.0]
    second = table.update(ids, torch.tensor([0.0, 1.0]))
    assert second.tolist() == [1.0, 0.0]
    assert table.visited() == 2


def test_ids_beyond_the_slots_share_a_slot() -> None:
    table = HistoryTable(slots=4, decay=1.0)
    table.update(torch.tensor([1]), torch.tensor([3.0]))
    assert table.memory(torch.tensor([5]), torch.device("cpu")).tolist() == [3.0]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(-4, 4, allow_nan=False), min_size=1, max_size=12),
    st.floats(0.05, 1.0),
)
def test_memory_is_the_exponential_average_of_the_visits(visits: list[float], decay: float) -> None:
    table = HistoryTable(slots=3, decay=decay)
    want = visits[0]
    for value in visits:
        got = table.update(torch.tensor([2]), torch.tensor([value]))
    for value in visits[1:]:
        want = (1 - decay) * want + decay * value
    # float16 storage: each visit rounds to about 3 decimal digits of the value
    assert abs(float(got[0]) - want) <= 4e-3 * max(1.0, abs(want)) * len(visits)


def test_state_round_trip_and_a_table_of_another_size_is_refused() -> None:
    table = HistoryTable(slots=8, decay=0.5)
    table.update(torch.tensor([0, 3, 7]), torch.tensor([1.0, 2.0, -3.0]))
    other = HistoryTable(slots=8, decay=0.5)
    other.load_state_dict(table.state_dict())
    ids = torch.arange(8)
    cpu = torch.device("cpu")
    torch.testing.assert_close(other.memory(ids, cpu), table.memory(ids, cpu), equal_nan=True)
    with pytest.raises(ValueError, match="--roclip-history-slots"):
        HistoryTable(slots=9, decay=0.5).load_state_dict(table.state_dict())


def test_a_slot_costs_two_bytes() -> None:
    table = HistoryTable(slots=1000, decay=0.5)
    table.update(torch.tensor([0]), torch.tensor([1.0]))
    assert table.values is not None
    assert BYTES_PER_SLOT == 2
    assert table.values.element_size() * table.values.numel() == 2000


def test_an_empty_table_resizes_and_one_holding_memories_refuses() -> None:
    """A trainer may learn its row count after building the defense: before the first visit
    the table takes it; after, resizing would move every id to another slot."""
    table = HistoryTable(slots=8, decay=0.5)
    table.resize(20)
    table.update(torch.tensor([12, 19]), torch.tensor([1.0, -1.0]))
    assert table.slots == 20 and table.visited() == 2  # no id shares a slot below 20
    with pytest.raises(ValueError, match="holds 2 memories in 20 slots.*cannot be resized"):
        table.resize(30)
    assert table.slots == 20
    with pytest.raises(ValueError, match="must be >= 1"):
        HistoryTable(slots=8, decay=0.5).resize(0)
