"""What the demo reports: each run's figures, the verdicts, the plot and ``results.json``.

:class:`RunFigures` gathers one run's per-epoch and final evaluation; :func:`verdicts` says in
words whether the defense cut the attacks without breaking clean accuracy;
:func:`plot_attack_success` draws attack success per epoch (:mod:`roclip_kit.demo.plot`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roclip_kit.demo.plot import SHADE_LABEL, Chart, PlotUnavailable, Series, draw_chart


@dataclass
class RunFigures:
    """One training run's figures: per epoch attack success, and the final evaluation.

    ``matching`` (tensor path) holds, per 1-based matching epoch, what matching did: purity,
    the share of poisoned images matched to their poison's class, self-matches.
    """

    name: str
    roclip: bool
    train_seconds: float
    eval_seconds: float
    defended_epochs: list[int]
    per_epoch: dict[int, dict[str, Any]]
    final: dict[str, Any]
    matching: dict[int, dict[str, Any]] = field(default_factory=dict)
    pairs_per_second: float | None = None

    def summary(self) -> dict[str, Any]:
        """The table's figures (fractions), from the final evaluation."""
        final = self.final
        probe = final.get("linear_probe") or {}
        backdoor = final.get("backdoor") or {}
        detection = final.get("detection") or []
        groups = (final.get("targeted") or {}).get("by_captions") or {}
        return {
            **_epoch_figures(final),
            "targeted_by_captions": {k: v["success_rate"] for k, v in groups.items()},
            "linear_probe": probe.get("accuracy"),
            "backdoor_clean_target_rate": backdoor.get("clean_target_rate"),
            "detection_precision": detection[-1]["precision"] if detection else None,
            "detection_recall": detection[-1]["recall"] if detection else None,
            "purity": _mean_of(self.matching, "purity"),
            "poison_class": _mean_of(self.matching, "poison_class"),
        }


def _mean_of(matching: Mapping[int, Mapping[str, Any]], key: str) -> float | None:
    values = [m[key] for m in matching.values() if m.get(key) is not None]
    return sum(values) / len(values) if values else None


Say = Callable[[str], None]


def _epoch_figures(evaluation: Mapping[str, Any]) -> dict[str, float | None]:
    """Clean zero-shot and both attacks' success of one evaluation (None: attack absent)."""
    targeted = evaluation.get("targeted") or {}
    backdoor = evaluation.get("backdoor") or {}
    return {
        "zero_shot": evaluation["zero_shot"]["accuracy"],
        "targeted_asr": targeted.get("success_rate"),
        "backdoor_asr": backdoor.get("success_rate"),
    }


COLLAPSE_POINTS = 5.0  # clean zero-shot this far below CLIP's: the defense "won" by breaking


ATTACK_TOOK_HOLD = 0.5  # CLIP's attack success below this: the run cannot show a defense


def verdicts(runs: list[RunFigures]) -> list[str]:
    """Plain-language readings of the table that a reader must not miss.

    A defended model with low attack success but much lower clean accuracy than CLIP has not
    resisted the attack; it has stopped learning the task. Nor does a run show a defense when
    CLIP itself never learned the task or the attack never took hold on CLIP. Say so instead of
    letting the ASR column speak alone.
    """
    clip = next((r for r in runs if not r.roclip), None)
    if clip is None:
        return []
    base = clip.summary()
    classes = len(clip.final["zero_shot"].get("per_class") or {}) or 10
    if base["zero_shot"] < 2.0 / classes:
        return [
            f"CLIP reached only {100 * base['zero_shot']:.1f}% zero-shot (chance "
            f"{100 / classes:.0f}%): the models did not learn the task, so no attack or "
            "defense figure of this run means anything; train longer or on more data"
        ]
    notes = []
    for run in (r for r in runs if r.roclip):
        notes += _run_verdicts(run, base)
    return notes


def _run_verdicts(run: RunFigures, base: dict[str, float | None]) -> list[str]:
    figures = run.summary()
    drop = 100 * (base["zero_shot"] - figures["zero_shot"])
    if drop > COLLAPSE_POINTS:
        return [
            f"{run.name}: clean zero-shot {drop:.1f} points below CLIP's: its attack "
            "success is not robustness (the model lost the task); see docs/demo.md"
        ]
    notes = []
    for key, attack in (("targeted_asr", "targeted"), ("backdoor_asr", "backdoor")):
        before, after = base[key], figures[key]
        if before is None or after is None:
            continue
        if before < ATTACK_TOOK_HOLD:
            notes.append(
                f"the {attack} attack did not take hold on CLIP ({100 * before:.1f}%): this "
                f"run cannot show a defense against it"
            )
        elif after < before:
            notes.append(
                f"{run.name} cut {attack} attack success from {100 * before:.1f}% to "
                f"{100 * after:.1f}% with clean zero-shot within {COLLAPSE_POINTS:g} points"
            )
        else:
            notes.append(
                f"{run.name} did not cut {attack} attack success ({100 * before:.1f}% for "
                f"CLIP, {100 * after:.1f}%)"
            )
    return notes


PURITY_COLOUR = (44, 160, 44)


def plot_attack_success(
    runs: list[RunFigures],
    path: Path,
    dataset: str,
    *,
    say: Say = print,
    eval_images: int | None = None,
    shade_label: str = SHADE_LABEL,
) -> Path | None:
    """Attack success, clean zero-shot and matching purity per epoch; defended epochs shaded.

    ``shade_label`` names the shaded epochs in the legend (the demo passes what its RoCLIP run
    did there: matched, or defended by dropping the risky pairs).

    ``eval_images``: the test images of each per-epoch check (the demo's ``eval_limit``; None:
    the whole test split), written under the axis so the lines are not read as final figures.

    Without matplotlib the demo's figures are all in results.json already: the plot is
    skipped (an older one at ``path`` removed, so it is never taken for this run's) and
    ``say`` tells how to get it. Returns the plot's path, or None when it was not drawn.
    """
    colours = {False: (31, 119, 180), True: (214, 39, 40)}
    series = []
    for run in runs:
        for key, kind, dashed in (
            ("targeted_asr", "targeted", False),
            ("backdoor_asr", "backdoor", True),
        ):
            values = {e: f[key] for e, f in run.per_epoch.items() if f.get(key) is not None}
            if values:
                series.append(Series(f"{run.name} {kind}", values, dashed, colours[run.roclip]))
        values = {
            e: f["zero_shot"] for e, f in run.per_epoch.items() if f.get("zero_shot") is not None
        }
        series.append(Series(f"{run.name} zero-shot", values, True, _light(colours[run.roclip])))
        purity = {e: m["purity"] for e, m in run.matching.items() if m.get("purity") is not None}
        if purity:
            series.append(Series(f"{run.name} matching purity", purity, False, PURITY_COLOUR))
    shaded = next((r.defended_epochs for r in runs if r.roclip), [])
    checked = "all test images" if eval_images is None else f"{eval_images:,} test images"
    chart = Chart(
        f"Poisoned {dataset}: attack success and clean accuracy",
        series,
        shaded,
        x_label=f"epoch (each epoch checked on {checked})",
        y_label="share of images",
        shade_label=shade_label,
    )
    try:
        return draw_chart(chart, path)
    except PlotUnavailable as err:
        path.unlink(missing_ok=True)
        say(f"plot not drawn: {err}")
        return None


def _light(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = colour
    return (r + (255 - r) // 2, g + (255 - g) // 2, b + (255 - b) // 2)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:

    path.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False))
