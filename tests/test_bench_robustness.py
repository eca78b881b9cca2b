"""benchmarks/bench_robustness.py: the table of saved runs (means and spreads over seeds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_robustness as br  # noqa: E402


def _row(seed: int, variant: str, zero_shot: float, **extra: float) -> dict:
    return {
        "dataset": "mnist",
        "seed": seed,
        "rate": 0.001,
        "variant": variant,
        "zero_shot": zero_shot,
        "targeted_asr": extra.get("targeted", 1.0),
        "targeted_10": 1.0,
        "backdoor_asr": extra.get("backdoor", 0.9),
        "train_seconds": 400.0 + seed,
    }


def _save(out: Path, rows: list[dict]) -> None:
    (out / "runs").mkdir(parents=True)
    for row in rows:
        name = f"{row['dataset']}-s{row['seed']}-r{row['rate']}-{row['variant']}.json"
        (out / "runs" / name).write_text(json.dumps(row))


def test_report_tables_every_saved_run_with_mean_and_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(
        tmp_path,
        [
            _row(0, "clip", 0.90),
            _row(1, "clip", 0.92),
            _row(0, "roclip", 0.85, targeted=0.0, backdoor=0.02),
        ],
    )
    assert br.main(["--out", str(tmp_path), "--report"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("3 saved runs in ")
    lines = {line.split(" | ")[2]: line for line in printed.splitlines() if "| mnist |" in line}
    assert lines["clip"].startswith("| mnist | 0.1% | clip | 2 | 91.0 ± 1.4 |")
    assert lines["roclip"].startswith("| mnist | 0.1% | roclip | 1 | 85.0 |")
    assert "| 0.0 |" in lines["roclip"] and "| 2.0 |" in lines["roclip"]
    assert (tmp_path / "report.md").read_text().count("| mnist |") == 2
    assert len(json.loads((tmp_path / "report.json").read_text())["rows"]) == 3


def test_report_without_saved_runs_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no saved runs in .*run the grid first"):
        br.main(["--out", str(tmp_path), "--report"])
