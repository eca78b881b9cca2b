"""When to match: pure functions of the epoch (or step block) and the configuration.

The schedule counts *units*: epochs (0-based, as OpenCLIP counts them), or blocks of
``period_steps`` optimiser steps for runs with few long epochs. A unit is a matching unit when:

- ``periodic``: ``unit >= first`` and ``(unit - first) % K == 0``. With ``first = K - 1`` this is
  exactly the authors' rule (1-based epochs matching when ``epoch % K == 0``).
- ``ramp``: from ``first`` on, the gap between matching units shrinks linearly from ``K`` to
  ``ramp_final_every`` over the run (match more often as the model gets better).
- ``adaptive``: periodic from the unit after the first one whose in-batch image-to-text
  retrieval accuracy reached ``adaptive_threshold``, and never before ``first``.

Why a warm-up: a weak early model matches images to captions by colour and style rather than
content and then learns from those wrong pairs (see docs/config.md for the measurements).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from roclip_plugin.config import RoClipConfig


def schedule_unit(epoch: int, step: int, period_steps: int) -> int:
    """The unit the schedule counts: the epoch, or the block of ``period_steps`` global steps."""
    _non_negative("epoch", epoch)
    _non_negative("step", step)
    return epoch if period_steps == 0 else step // period_steps


def reference_is_matching(epoch_one_based: int, every: int) -> bool:
    """The authors' rule, in their numbering (epochs from 1): match when ``epoch % K == 0``."""
    if epoch_one_based < 1:
        raise ValueError(f"epoch_one_based: invalid value {epoch_one_based}; allowed: >= 1")
    return epoch_one_based % every == 0


def is_periodic_match(unit: int, first: int, every: int) -> bool:
    """Whether ``unit`` is ``first``, ``first + K``, ``first + 2K``, ..."""
    _non_negative("unit", unit)
    return unit >= first and (unit - first) % every == 0


def ramp_gap(unit: int, first: int, total_units: int, start_every: int, final_every: int) -> int:
    """Gap to the next matching unit at ``unit``: linear from ``start_every`` to ``final_every``."""
    span = max(total_units - 1 - first, 1)
    progress = min(max((unit - first) / span, 0.0), 1.0)
    return max(1, round(start_every + (final_every - start_every) * progress))


@functools.lru_cache(maxsize=64)
def ramp_matching_units(
    first: int, total_units: int, start_every: int, final_every: int
) -> frozenset[int]:
    """Every matching unit of a ramp schedule over ``total_units`` units."""
    units, unit = set(), first
    while unit < total_units:
        units.add(unit)
        unit += ramp_gap(unit, first, total_units, start_every, final_every)
    return frozenset(units)


def adaptive_start(alignment: Mapping[int, float], threshold: float, first: int) -> int | None:
    """First matching unit: after the earliest unit whose accuracy reached ``threshold``."""
    reached = [unit for unit, acc in alignment.items() if acc >= threshold]
    if not reached:
        return None
    return max(first, min(reached) + 1)


@dataclass
class ScheduleState:
    """What a schedule must remember across units; saved in checkpoints.

    ``alignment`` maps a unit to its mean in-batch image-to-text retrieval accuracy, measured on
    plain units (what the adaptive schedule watches, and a useful log on its own). The adaptive
    start is derived from it, never stored separately, so it cannot drift out of step.
    """

    alignment: dict[int, float] = field(default_factory=dict)

    def record_alignment(self, unit: int, accuracy: float) -> None:
        """Store a unit's mean in-batch retrieval accuracy."""
        self.alignment[unit] = float(accuracy)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints."""
        return {"alignment": dict(self.alignment)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.alignment = {int(k): float(v) for k, v in state["alignment"].items()}


def is_matching_unit(
    unit: int,
    config: RoClipConfig,
    *,
    total_units: int | None = None,
    state: ScheduleState | None = None,
) -> bool:
    """The built-in decision for ``unit`` under ``config``.

    Args:
        unit: epoch index (0-based) or step-block index, see :func:`schedule_unit`.
        config: the RoCLIP configuration.
        total_units: run length in units; needed by ``ramp`` and ``warmup_fraction``.
        state: adaptive-schedule memory; without it an adaptive schedule never matches.
    """
    _non_negative("unit", unit)
    if config.schedule == "ramp":
        if total_units is None:
            raise ValueError(
                "--roclip-schedule ramp needs the run length (total epochs, or total steps with "
                "--roclip-period-steps): pass total_units"
            )
        first = config.resolved_first_epoch(total_units)
        return unit in ramp_matching_units(
            first, total_units, config.defend_every, config.ramp_final_every
        )
    first = config.resolved_first_epoch(total_units)
    if config.schedule == "adaptive":
        alignment = state.alignment if state is not None else {}
        start = adaptive_start(alignment, config.adaptive_threshold, first)
        return start is not None and is_periodic_match(unit, start, config.defend_every)
    return is_periodic_match(unit, first, config.defend_every)


def matching_units(
    config: RoClipConfig, total_units: int, state: ScheduleState | None = None
) -> list[int]:
    """All matching units of a run (for logs, docs and plans)."""
    return [
        unit
        for unit in range(total_units)
        if is_matching_unit(unit, config, total_units=total_units, state=state)
    ]


def _non_negative(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: invalid value {value!r}; allowed: an integer >= 0")
