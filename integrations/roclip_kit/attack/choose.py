"""Choosing what to poison: target images, their adversarial classes and captions, backdoor rows.

Pure draws from a seeded ``numpy`` generator over a :class:`~roclip_kit.attack.tables.Table`,
so the same seed chooses the same rows; :mod:`roclip_kit.attack.poison` writes what is chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from roclip_kit.attack.tables import Table, _valid


def class_index(name: str | int, classes: list[str], flag: str) -> int:
    """The label of a class given by name (any case) or index; a clear error otherwise."""
    if isinstance(name, int) and not isinstance(name, bool):
        if 0 <= name < len(classes):
            return name
    elif isinstance(name, str):
        lowered = [c.lower() for c in classes]
        if name.strip().lower() in lowered:
            return lowered.index(name.strip().lower())
        if name.strip().isdigit() and int(name) < len(classes):
            return int(name)
    raise ValueError(f"{flag} {name!r} is not a class of this dataset ({_valid(classes)})")


def sample_captions(pool: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions from ``pool``: without replacement when it is big enough, else with."""
    picks = rng.choice(len(pool), size=n, replace=n > len(pool))
    return [pool[i] for i in picks]


def choose_targets(
    test: Table,
    count: int,
    target_rows: list[int] | None,
    adversarial: int | None,
    usable: list[int],
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """(test row, adversarial label) pairs: given rows or ``count`` drawn rows.

    ``usable`` lists the classes that have training captions to borrow.
    """
    if target_rows is not None:
        rows = _check_target_rows(target_rows, len(test.rows), count)
    else:
        candidates = (
            np.flatnonzero(test.labels != adversarial)
            if adversarial is not None
            else np.arange(len(test.rows))
        )
        if count > len(candidates):
            raise ValueError(
                f"--targets {count} exceeds the {len(candidates)} usable held-out rows of "
                f"{test.path}"
            )
        rows = [int(r) for r in rng.choice(candidates, size=count, replace=False)]
    return [(row, _adversarial_for(test, row, adversarial, usable, rng)) for row in rows]


def _check_target_rows(rows: list[int], available: int, count: int) -> list[int]:
    if count and count != len(rows):
        raise ValueError(f"--targets {count} but --target-rows lists {len(rows)} rows")
    if len(set(rows)) != len(rows):
        raise ValueError(f"--target-rows lists a row twice: {rows}")
    for row in rows:
        if not 0 <= row < available:
            raise ValueError(
                f"--target-rows: row {row} is outside the held-out CSV's rows 0..{available - 1}"
            )
    return list(rows)


def _adversarial_for(
    test: Table, row: int, adversarial: int | None, usable: list[int], rng: np.random.Generator
) -> int:
    label = int(test.labels[row])
    if adversarial is not None:
        if adversarial == label:
            raise ValueError(
                f"--target-rows: held-out row {row} is already of the adversarial class; "
                "choose another row or --adversarial-class"
            )
        return adversarial
    others = [c for c in usable if c != label]
    if not others:
        raise ValueError("targeted poisoning needs training captions of another class")
    return int(rng.choice(others))


def choose_backdoor_rows(
    labels: np.ndarray, target_label: int, count: int, rng: np.random.Generator
) -> list[int]:
    """Sorted rows, not of the target class, that get the trigger."""
    candidates = np.flatnonzero(labels != target_label)
    if count > len(candidates):
        raise ValueError(
            f"backdoor count {count} (--backdoor-count/--backdoor-rate) exceeds the "
            f"{len(candidates)} training rows not of the target class"
        )
    return sorted(int(r) for r in rng.choice(candidates, size=count, replace=False))


def _backdoor_size(count: int | None, rate: float | None, rows: int) -> int:
    """Rows to backdoor from exactly one of a count and a rate (at least one row)."""
    if (count is None) == (rate is None):
        raise ValueError("give exactly one of --backdoor-count and --backdoor-rate")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"--backdoor-count must be a positive integer, got {count!r}")
        return count
    if not isinstance(rate, int | float) or not 0.0 < rate < 1.0:
        raise ValueError(f"--backdoor-rate must be in (0, 1), e.g. 0.001 for 0.1%, got {rate!r}")
    return max(1, round(rate * rows))


def caption_counts(per_target: int | Sequence[int], targets: int) -> list[int]:
    """Poison captions of each target: one count for all, or equal consecutive groups.

    ``[10, 50]`` with 32 targets gives the first 16 targets 10 captions each and the other 16
    fifty: two attack strengths measured in one run.
    """
    groups = [per_target] if isinstance(per_target, int) else list(per_target)
    if len(groups) > targets:
        raise ValueError(
            f"--captions-per-target lists {len(groups)} groups for {targets} target(s): give "
            "at least one target per group"
        )
    return [groups[i * len(groups) // targets] for i in range(targets)]
