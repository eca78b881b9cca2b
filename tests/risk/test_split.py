"""Splits: the fixed share and SafeCLIP's Gaussian mixture, their invariants."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin.risk import MixtureSplit, fit_mixture, fixed_split
from roclip_plugin.risk.split import keep_one_per_rank


def test_fixed_split_takes_the_ceiling_of_the_share_ties_to_the_earlier_row() -> None:
    risk = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert fixed_split(risk, 0.2).tolist() == [False, True, False, False, False]
    assert fixed_split(risk, 0.3).tolist() == [False, True, False, True, False]


def test_every_rank_keeps_a_safe_pair_when_risky_pairs_leave_the_loss() -> None:
    risk = torch.tensor([5.0, 4.0, 0.0, 1.0])  # rank 0 holds the two riskiest
    risky = fixed_split(risk, 0.5, world_size=2)
    assert risky.tolist() == [True, False, False, False]  # rank 0's least risky pair stays
    assert fixed_split(risk, 0.5, world_size=2, keep_one=False).tolist() == [
        True,
        True,
        False,
        False,
    ]
    assert not keep_one_per_rank(torch.ones(6, dtype=torch.bool), torch.arange(6.0), 3).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=64),
    st.floats(0.01, 0.99),
)
def test_fixed_split_share_and_order(values: list[float], share: float) -> None:
    risk = torch.tensor(values)
    risky = fixed_split(risk, share, keep_one=False)
    assert int(risky.sum()) == min(len(values), math.ceil(round(share * len(values), 9)))
    if risky.any() and (~risky).any():
        assert float(risk[risky].min()) >= float(risk[~risky].max())


def _two_clusters(low: int, high: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [torch.randn(low, generator=g) * 0.1, 3 + torch.randn(high, generator=g) * 0.1]
    )


def test_the_mixture_finds_two_separated_groups() -> None:
    mixture = fit_mixture(_two_clusters(900, 100))
    assert mixture is not None
    assert abs(mixture.means[0]) < 0.05 and abs(mixture.means[1] - 3) < 0.05
    assert abs(mixture.weights[1] - 0.1) < 0.01
    assert fit_mixture(torch.ones(10)) is None


def test_mixture_split_marks_the_high_risk_group() -> None:
    split = MixtureSplit(window=4096, threshold=0.9, max_risky=1.0)
    values = _two_clusters(900, 100)
    split.observe(values)
    batch = torch.tensor([0.0, 3.0, 0.1, 2.9])
    assert split(batch, epoch=0).tolist() == [False, True, False, True]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    st.integers(0, 10_000),
    st.floats(0.05, 1.0),
    st.floats(0.0, 0.9),
    st.integers(1, 4),
)
def test_mixture_split_invariants(seed: int, max_risky: float, floor: float, world: int) -> None:
    """Row order does not matter; the caps hold; every rank keeps a safe pair."""
    rows = 8 * world
    values = _two_clusters(60, 40, seed)
    split = MixtureSplit(window=4096, threshold=0.9, max_risky=max_risky, floor_start=floor)
    split.observe(values)
    batch = values[torch.randperm(100, generator=torch.Generator().manual_seed(seed))[:rows]]
    risky = split(batch, epoch=0, world_size=world, keep_one=False)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(split(batch[order], epoch=0, keep_one=False), risky[order])
    assert int(risky.sum()) <= math.ceil(round(max_risky * rows, 9))
    assert int((~risky).sum()) >= math.ceil(round(floor * rows, 9))
    kept = split(batch, epoch=0, world_size=world)
    assert all((~kept.view(world, -1)).any(dim=1).tolist())


def test_safe_floor_grows_each_epoch_from_the_first_defended_one() -> None:
    split = MixtureSplit(
        window=16, threshold=0.9, max_risky=1.0, floor_start=0.1, floor_growth=0.05
    )
    assert split.safe_floor(3) == 0.1
    assert math.isclose(split.safe_floor(5), 0.2)
    restored = MixtureSplit(
        window=16, threshold=0.9, max_risky=1.0, floor_start=0.1, floor_growth=0.05
    )
    restored.load_state_dict(split.state_dict())
    assert math.isclose(restored.safe_floor(5), 0.2)
