"""roclip_plugin.distributed on one process (the two-process behaviour: test_distributed.py)."""

from __future__ import annotations

import random

import numpy as np
import torch

from roclip_plugin.distributed import (
    all_gather_objects,
    all_reduce_sum,
    is_distributed,
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
