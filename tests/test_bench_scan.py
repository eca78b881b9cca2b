"""benchmarks/bench_scan.py: a ``--quick`` run poisons toy data, trains, scans, prints a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("faiss")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_scan as bs  # noqa: E402

from roclip_plugin.scan import DETECTORS  # noqa: E402


def test_a_quick_run_prints_one_row_per_detector_and_saves_the_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bs.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("roclip scan benchmark, ")
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("| detector |"))
    assert "digits-s0-r0.05 backdoor (k=" in header and "targeted (k=" in header
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    for name in DETECTORS:
        cells = rows[name].strip("| ").split(" | ")[1:]
        assert len(cells) == 2, rows[name]
        for cell in cells:  # "0.9876 (0.50)": an AUROC and a precision, both in [0, 1]
            auroc, precision = cell.replace("(", "").replace(")", "").split()
            assert 0.0 <= float(auroc) <= 1.0 and 0.0 <= float(precision) <= 1.0
    assert "pairs/s" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    (cell,) = saved["cells"]
    assert cell["cell"] == "digits-s0-r0.05" and cell["pairs"] > 300
    assert (tmp_path / "digits-s0-r0.05" / "clip.pt").is_file()
    assert (tmp_path / "results.md").read_text().strip() == printed.strip()
