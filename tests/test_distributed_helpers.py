"""roclip_plugin.distributed on one process (the two-process behaviour: test_distributed.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from roclip_plugin.distributed import (
    all_gather_objects,
    all_reduce_sum,
    is_distributed,
    launch_rank,
    launch_world_size,
    process_rank,
    rank_and_world_size,
    rng_state,
    set_rng_state,
)


def test_single_process_collectives_are_identities() -> None:
    assert not is_distributed()
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert torch.equal(all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))


def test_rng_state_round_trip_restores_every_generator() -> None:
    state = rng_state()
    want = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_without_a_process_group_this_is_rank_0_of_1() -> None:
    assert rank_and_world_size() == (0, 1) and process_rank() == 0


@pytest.mark.parametrize(("value", "want"), [(None, 0), ("", 0), ("3", 3)])
def test_launch_rank_reads_torchrun_s_rank(monkeypatch, value, want) -> None:
    """A DataLoader worker has no process group to ask, but inherits the launcher's RANK."""
    if value is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", value)
    assert launch_rank() == want


@pytest.mark.parametrize(("value", "want"), [(None, 1), ("4", 4), ("0", 1), ("x", 1), ("", 1)])
def test_launch_world_size_is_1_when_unset_or_unreadable(monkeypatch, value, want) -> None:
    if value is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", value)
    assert launch_world_size() == want
