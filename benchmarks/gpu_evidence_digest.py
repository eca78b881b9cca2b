"""gpu_evidence.py's digests: each part's output file read into figures and goals.

One ``digest_*`` per measuring part turns what its child wrote (JSON, or junit XML for the
``gpu``-marked tests) into the record's figures and the goals they meet or miss.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from gpu_evidence_core import (
    AUGMENT_GOAL_PCT,
    MATCHING_GOAL_X,
    ON_H100_STEP_MS,
    REPO,
    STEP_GOAL_PCT,
    Context,
    Goal,
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def digest_environment(ctx: Context, path: Path) -> tuple[dict[str, Any], list[Goal]]:
    """The environment report as is; no goal."""
    return _read_json(path), []


def digest_matching(ctx: Context, path: Path) -> tuple[dict[str, Any], list[Goal]]:
    """Per shape: the better exact path's time over the bf16 product's (goal: <= 1.3x)."""
    figures = _read_json(path)
    goals = []
    for row in figures["rows"]:
        ratios = {
            "fp32": row["match_fp32_vs_bf16_matmul"],
            "bf16": row["match_bf16_vs_bf16_matmul"],
        }
        best = min(ratios, key=ratios.__getitem__)
        goals.append(
            Goal(
                "matching",
                f"exact search vs bf16 matmul, {row['batch']:,} x {row['pool']:,} x {row['dim']:,}",
                f"<= {MATCHING_GOAL_X}x",
                ratios[best],
                "x",
                ratios[best] <= MATCHING_GOAL_X,
                f"best exact path: {best} search ({ratios['fp32']:.2f}x fp32, "
                f"{ratios['bf16']:.2f}x bf16 + re-score)",
            )
        )
    return figures, goals


def digest_step(ctx: Context, path: Path) -> tuple[dict[str, Any], list[Goal]]:
    """Each matching step's overhead over the plain step, in percent (goal: < 1%)."""
    figures = _read_json(path)
    kinds = figures["kinds"]
    plain = kinds["clip"]["median_ms"]
    spread = figures["clip_spread_ms"]
    goals = []
    for name, kind in kinds.items():
        if name == "clip":
            continue
        goals.append(
            Goal(
                "openclip_step",
                f"RoCLIP matching-step overhead, {name.split('_')[1]} search, "
                f"{figures['model']} batch {figures['batch']} {figures['precision']}",
                f"< {STEP_GOAL_PCT:g}% of the plain step",
                kind["overhead_pct"],
                "%",
                kind["overhead_pct"] < STEP_GOAL_PCT,
                f"plain {plain:.2f} ms (an H100 took about {ON_H100_STEP_MS:g} ms), "
                f"{kind['median_ms']:.2f} ms with RoCLIP; spread of the plain step "
                f"{spread:.2f} ms",
            )
        )
    return figures, goals


def digest_small_gpu(ctx: Context, path: Path) -> tuple[dict[str, Any], list[Goal]]:
    """The preset's pairs per second; a figure owed, with no goal to read it against."""
    return _read_json(path), []


def digest_augment(ctx: Context, path: Path) -> tuple[dict[str, Any], list[Goal]]:
    """The batch's time as a share of part 3's plain step (goal: < 5%)."""
    figures = _read_json(path)
    ms = figures["batched"]["ms"]
    step = ctx.figures("openclip_step")
    plain = step["kinds"]["clip"]["median_ms"] if step else None
    share = 100 * ms / plain if plain else None
    figures["share_of_step_pct"] = share
    note = f"{figures['batched']['batch']} images at {figures['batched']['size']} px: {ms:.2f} ms"
    note += f"; plain step {plain:.2f} ms" if plain else "; no step time (part 3 did not end well)"
    goal = Goal(
        "augment",
        f"batched augmentation as a share of the {step['model'] if step else 'ViT-B-32'} step",
        f"< {AUGMENT_GOAL_PCT:g}%",
        share,
        "%",
        None if share is None else share < AUGMENT_GOAL_PCT,
        note,
    )
    return figures, [goal]


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and the failed tests' names from pytest's junit XML."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        tags = {child.tag for child in case}
        if "failure" in tags:
            counts["failed"] += 1
            failed.append(name)
        elif "error" in tags:
            counts["errors"] += 1
            failed.append(name)
        elif "skipped" in tags:
            counts["skipped"] += 1
            skipped.append(name)
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "skipped_tests": skipped}


def digest_tests(ctx: Context, path: Path) -> tuple[dict[str, Any], list[Goal]]:
    """All ``gpu`` tests pass, and some ran (on a CPU every one of them skips)."""
    figures = parse_junit(path)
    bad = figures["failed"] + figures["errors"]
    ran = figures["passed"] > 0
    goal = Goal(
        "gpu_tests",
        "the gpu-marked tests",
        "all pass",
        float(figures["passed"]),
        "passed",
        (bad == 0) if ran else (False if bad else None),
        f"{figures['passed']} passed, {figures['failed']} failed, {figures['errors']} errors, "
        f"{figures['skipped']} skipped of {figures['tests']}",
    )
    return figures, [goal]


def gpu_test_files(root: Path = REPO / "tests") -> list[str]:
    """Test files holding a ``gpu`` mark, relative to the repository.

    Only these are collected: the GPU image lacks faiss and other test-only packages, and a
    module that fails to import would stop the whole pytest run.
    """
    return sorted(
        str(p.relative_to(REPO))
        for p in root.rglob("test_*.py")
        if "pytest.mark.gpu" in p.read_text(encoding="utf-8")
    )
