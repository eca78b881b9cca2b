"""Schedules: periodic, the authors' numbering, ramp, adaptive and their state."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin.config import RoClipConfig
from roclip_plugin.schedule import (
    ScheduleState,
    adaptive_start,
    is_matching_unit,
    is_periodic_match,
    matching_units,
    ramp_gap,
    ramp_matching_units,
    reference_is_matching,
    schedule_unit,
)

SETTINGS = settings(max_examples=100, deadline=None)


# -- periodic ----------------------------------------------------------------------------------


@given(first=st.integers(0, 50), every=st.integers(1, 20), horizon=st.integers(1, 200))
@SETTINGS
def test_periodic_units_are_first_plus_multiples_of_k(first: int, every: int, horizon: int) -> None:
    got = [u for u in range(horizon) if is_periodic_match(u, first, every)]
    assert got == list(range(first, horizon, every))


@given(
    first=st.none() | st.integers(0, 30),
    every=st.integers(1, 12),
    total=st.integers(1, 120),
)
@SETTINGS
def test_matching_units_of_periodic_config(first: int | None, every: int, total: int) -> None:
    cfg = RoClipConfig(defend_every=every, first_defended_epoch=first)
    start = every - 1 if first is None else first
    assert matching_units(cfg, total) == list(range(start, total, every))
    for unit in range(total):
        assert is_matching_unit(unit, cfg) == (unit in range(start, total, every))


def test_default_config_schedule() -> None:
    # the default (robust): every epoch from the second; the paper's: K = 2 from epoch 5
    assert matching_units(RoClipConfig(), 12) == list(range(1, 12))
    assert matching_units(RoClipConfig.from_preset("paper"), 12) == [5, 7, 9, 11]


@given(every=st.integers(1, 30), epochs=st.integers(1, 150))
@SETTINGS
def test_reference_preset_matches_authors_rule(every: int, epochs: int) -> None:
    cfg = RoClipConfig.from_preset("reference", defend_every=every)
    for epoch in range(epochs):  # 0-based, as OpenCLIP counts
        assert is_matching_unit(epoch, cfg) == reference_is_matching(epoch + 1, every)
        assert is_matching_unit(epoch, cfg, total_units=epochs) == ((epoch + 1) % every == 0)


def test_reference_rule_examples() -> None:
    assert [e for e in range(1, 11) if reference_is_matching(e, 2)] == [2, 4, 6, 8, 10]
    assert [e for e in range(1, 11) if reference_is_matching(e, 3)] == [3, 6, 9]
    assert matching_units(RoClipConfig.from_preset("reference"), 10) == [1, 3, 5, 7, 9]
    assert matching_units(RoClipConfig.from_preset("reference", defend_every=1), 4) == [0, 1, 2, 3]


def test_reference_rule_refuses_epoch_zero() -> None:
    with pytest.raises(ValueError, match="epoch_one_based"):
        reference_is_matching(0, 2)


@given(fraction=st.floats(0.0, 1.0, exclude_max=True), every=st.integers(1, 10))
@settings(max_examples=50, deadline=None)
def test_warmup_fraction_sets_first_matching_epoch(fraction: float, every: int) -> None:
    total = 40
    cfg = RoClipConfig(warmup_fraction=fraction, defend_every=every, first_defended_epoch=3)
    first = cfg.resolved_first_epoch(total)
    assert matching_units(cfg, total) == list(range(first, total, every))


def test_warmup_fraction_needs_run_length_in_schedule() -> None:
    cfg = RoClipConfig(warmup_fraction=0.5)
    with pytest.raises(ValueError, match="--roclip-warmup-fraction"):
        is_matching_unit(3, cfg)


# -- units -------------------------------------------------------------------------------------


@given(epoch=st.integers(0, 10**6), step=st.integers(0, 10**9), period=st.integers(0, 10**5))
@SETTINGS
def test_schedule_unit(epoch: int, step: int, period: int) -> None:
    unit = schedule_unit(epoch, step, period)
    if period == 0:
        assert unit == epoch
    else:
        assert unit * period <= step < (unit + 1) * period


@given(period=st.integers(1, 50), steps=st.integers(1, 500))
@settings(max_examples=50, deadline=None)
def test_step_blocks_are_contiguous(period: int, steps: int) -> None:
    units = [schedule_unit(0, s, period) for s in range(steps)]
    assert units[0] == 0
    assert all(b - a in (0, 1) for a, b in zip(units, units[1:], strict=False))
    for u in set(units) - {units[-1]}:
        assert units.count(u) == period  # every complete block has exactly period_steps steps
    assert units.count(units[-1]) <= period
    assert units[-1] == (steps - 1) // period


@pytest.mark.parametrize(
    ("epoch", "step", "name"), [(-1, 0, "epoch"), (0, -1, "step"), (True, 0, "epoch")]
)
def test_schedule_unit_rejects_bad_counters(epoch: int, step: int, name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: invalid value"):
        schedule_unit(epoch, step, 10)


@pytest.mark.parametrize("unit", [-1, -100, True, 1.0])
def test_invalid_unit_raises(unit: object) -> None:
    with pytest.raises(ValueError, match="unit: invalid value"):
        is_matching_unit(unit, RoClipConfig())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unit: invalid value"):
        is_periodic_match(unit, 0, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["periodic", "ramp", "adaptive"])
def test_invalid_unit_raises_for_every_schedule(schedule: str) -> None:
    with pytest.raises(ValueError, match="allowed: an integer >= 0"):
        is_matching_unit(-1, RoClipConfig(schedule=schedule), total_units=10, state=ScheduleState())


# -- ramp --------------------------------------------------------------------------------------


@given(
    every=st.integers(1, 12),
    final=st.integers(1, 12),
    first=st.integers(0, 20),
    total=st.integers(1, 400),
)
@SETTINGS
def test_ramp_shape(every: int, final: int, first: int, total: int) -> None:
    final = min(final, every)
    cfg = RoClipConfig(
        schedule="ramp", defend_every=every, ramp_final_every=final, first_defended_epoch=first
    )
    units = matching_units(cfg, total)
    assert units == sorted(ramp_matching_units(first, total, every, final))
    assert all(0 <= u < total for u in units)
    if first >= total:
        assert units == []
        return
    assert units[0] == first
    gaps = [b - a for a, b in zip(units, units[1:], strict=False)]
    assert all(final <= g <= every for g in gaps)
    assert all(b <= a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    if gaps:
        assert gaps[0] == every
    # the run ends no more than one gap after the last matching unit
    assert total - units[-1] <= ramp_gap(units[-1], first, total, every, final)
    if total - first >= 2 * every * every:  # long enough to reach the final period
        assert gaps[-1] == final


def test_ramp_examples() -> None:
    cfg = RoClipConfig(schedule="ramp", defend_every=4, ramp_final_every=1, first_defended_epoch=2)
    units = matching_units(cfg, 40)
    gaps = [b - a for a, b in zip(units, units[1:], strict=False)]
    assert units[0] == 2
    assert gaps[0] == 4
    assert gaps[-1] == 1
    assert units[-1] == 39


@given(every=st.integers(1, 10), first=st.integers(0, 10), total=st.integers(1, 100))
@settings(max_examples=50, deadline=None)
def test_ramp_with_constant_period_is_periodic(every: int, first: int, total: int) -> None:
    ramp = RoClipConfig(
        schedule="ramp", defend_every=every, ramp_final_every=every, first_defended_epoch=first
    )
    periodic = ramp.replace(schedule="periodic")
    assert matching_units(ramp, total) == matching_units(periodic, total)


def test_ramp_without_total_units_raises() -> None:
    cfg = RoClipConfig(schedule="ramp")
    with pytest.raises(ValueError, match="--roclip-schedule ramp needs the run length"):
        is_matching_unit(5, cfg)
    with pytest.raises(ValueError, match="total_units"):
        is_matching_unit(5, cfg, total_units=None)


def test_ramp_with_warmup_fraction() -> None:
    cfg = RoClipConfig(schedule="ramp", warmup_fraction=0.5, defend_every=3, ramp_final_every=1)
    units = matching_units(cfg, 20)
    assert units[0] == 10
    assert all(u >= 10 for u in units)


# -- adaptive ----------------------------------------------------------------------------------


def _run_adaptive(cfg: RoClipConfig, accuracies: list[float]) -> tuple[list[int], ScheduleState]:
    """Simulate a run: decide each unit, then record its accuracy if it was a plain unit."""
    state = ScheduleState()
    total = len(accuracies)
    matched = []
    for unit, acc in enumerate(accuracies):
        if is_matching_unit(unit, cfg, total_units=total, state=state):
            matched.append(unit)
        else:
            state.record_alignment(unit, acc)
    return matched, state


@given(
    every=st.integers(1, 6),
    first=st.none() | st.integers(0, 15),
    threshold=st.floats(0.05, 1.0),
    accuracies=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60),
)
@SETTINGS
def test_adaptive_schedule(
    every: int, first: int | None, threshold: float, accuracies: list[float]
) -> None:
    cfg = RoClipConfig(
        schedule="adaptive",
        defend_every=every,
        first_defended_epoch=first,
        adaptive_threshold=threshold,
    )
    matched, _ = _run_adaptive(cfg, accuracies)
    reached = [u for u, acc in enumerate(accuracies) if acc >= threshold]
    resolved_first = every - 1 if first is None else first
    if not reached:
        assert matched == []
        return
    start = max(resolved_first, reached[0] + 1)
    # never before the threshold was reached, never before first_defended_epoch, then periodic
    assert all(u > reached[0] for u in matched)
    assert all(u >= resolved_first for u in matched)
    assert matched == list(range(start, len(accuracies), every))


def test_adaptive_examples() -> None:
    cfg = RoClipConfig(
        schedule="adaptive", defend_every=2, first_defended_epoch=1, adaptive_threshold=0.5
    )
    matched, state = _run_adaptive(cfg, [0.1, 0.2, 0.6, 0.3, 0.9, 0.9, 0.9, 0.9])
    assert matched == [3, 5, 7]
    assert set(state.alignment) == {0, 1, 2, 4, 6}
    # a late start is held back by first_defended_epoch
    late = cfg.replace(first_defended_epoch=6)
    assert _run_adaptive(late, [0.9] * 10)[0] == [6, 8]
    # the threshold is inclusive
    assert _run_adaptive(cfg, [0.5, 0.0, 0.0, 0.0])[0] == [1, 3]


def test_adaptive_without_state_never_matches() -> None:
    cfg = RoClipConfig(schedule="adaptive", first_defended_epoch=0, defend_every=1)
    assert not any(is_matching_unit(u, cfg, total_units=50) for u in range(50))
    assert matching_units(cfg, 50) == []


def test_adaptive_start_function() -> None:
    assert adaptive_start({}, 0.5, 0) is None
    assert adaptive_start({0: 0.1, 1: 0.4}, 0.5, 0) is None
    assert adaptive_start({0: 0.1, 3: 0.7, 1: 0.5}, 0.5, 0) == 2
    assert adaptive_start({0: 0.9}, 0.5, 4) == 4


# -- state -------------------------------------------------------------------------------------


@given(
    alignment=st.dictionaries(st.integers(0, 1000), st.floats(0.0, 1.0), max_size=30),
    threshold=st.floats(0.05, 1.0),
)
@SETTINGS
def test_schedule_state_round_trip(alignment: dict[int, float], threshold: float) -> None:
    state = ScheduleState()
    for unit, acc in alignment.items():
        state.record_alignment(unit, acc)
    saved = state.state_dict()
    state.record_alignment(5000, 1.0)  # the saved dict is a copy
    assert 5000 not in saved["alignment"]

    for blob in (saved, json.loads(json.dumps(saved))):  # JSON turns keys into strings
        restored = ScheduleState()
        restored.load_state_dict(blob)
        assert restored.alignment == alignment
        assert all(isinstance(k, int) for k in restored.alignment)

    restored = ScheduleState()
    restored.load_state_dict(json.loads(json.dumps(saved)))
    original = ScheduleState(dict(alignment))
    cfg = RoClipConfig(schedule="adaptive", first_defended_epoch=0, adaptive_threshold=threshold)
    assert matching_units(cfg, 60, restored) == matching_units(cfg, 60, original)


def test_record_alignment_stores_floats() -> None:
    state = ScheduleState()
    state.record_alignment(3, 1)
    assert state.alignment == {3: 1.0}
    assert isinstance(state.alignment[3], float)
    state.record_alignment(3, 0.25)
    assert state.alignment == {3: 0.25}


def test_matching_units_helper_passes_state() -> None:
    cfg = RoClipConfig(
        schedule="adaptive", defend_every=3, first_defended_epoch=0, adaptive_threshold=0.5
    )
    state = ScheduleState({4: 0.8})
    assert matching_units(cfg, 15, state) == [5, 8, 11, 14]
    assert matching_units(cfg, 15) == []
    assert matching_units(cfg, 0, state) == []
