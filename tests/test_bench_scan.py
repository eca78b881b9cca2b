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

import bench_robustness as br  # noqa: E402
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


def test_retrain_drops_the_top_rows_retrains_plain_clip_and_saves_rows_the_report_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--retrain: clip (scanned), scan-filter on the kept rows, clip-clean; one row each."""
    out, runs = tmp_path / "out", tmp_path / "grid" / "runs"
    argv = ["--quick", "--out", str(out), "--threads", "1", "--retrain", "--floor"]
    assert bs.main([*argv, "--runs-dir", str(runs), "--drop-fraction", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert (out / "results.md").read_text().strip() == printed.strip()
    key = "digits-s0-r0.05"
    names = {p.name for p in runs.iterdir()}
    assert names == {f"{key}-{v}.json" for v in ("clip", "clip-clean", "scan-filter")}
    row = json.loads((runs / f"{key}-scan-filter.json").read_text())
    clip = json.loads((runs / f"{key}-clip.json").read_text())
    # the robustness benchmark's keys, and the filter's
    assert set(clip) - {"targeted_2", "targeted_3"} <= set(row)
    assert (row["variant"], row["dataset"], row["seed"], row["rate"]) == (
        "scan-filter", "digits", 0, 0.05
    )  # fmt: skip
    for name in ("zero_shot", "linear_probe", "targeted_asr", "backdoor_asr", "drop_recall"):
        assert 0.0 <= row[name] <= 1.0, name
    assert row["drop_fraction"] == 0.1 and row["drop_by"] == "combined"
    manifest = json.loads((out / key / "poisoned" / "manifest.json").read_text())
    poisoned = len(manifest["rows"])
    pairs = json.loads((out / "results.json").read_text())["cells"][0]["pairs"]
    assert row["dropped_rows"] == -(-pairs // 10)  # 10% of the pairs, rounded up
    assert row["dropped_poison"] + row["dropped_clean"] == row["dropped_rows"]
    assert row["dropped_poison"] + row["kept_poison"] == row["poisoned_rows"] == poisoned
    assert row["dropped_backdoor"] + row["dropped_targeted"] == row["dropped_poison"]
    assert row["drop_recall"] == pytest.approx(row["dropped_poison"] / poisoned)
    assert all(0.0 <= v <= 1.0 for v in row["recall_at"].values())
    assert row["recall_at"]["0.1"] == row["drop_recall"]
    # the retrained data: the kept rows, the poisoned ones among them still in its manifest
    filtered = out / key / "filtered"
    kept = (filtered / "train.csv").read_text().splitlines()[1:]
    assert len(kept) == pairs - row["dropped_rows"]
    assert len(json.loads((filtered / "manifest.json").read_text())["rows"]) == row["kept_poison"]
    # the printed summary and the table's line of each run
    assert (
        f"{key}: dropped the top 10% by combined ({row['dropped_rows']} rows): "
        f"{row['dropped_poison']} of {poisoned} poisoned" in printed
    )
    lines = {ln.split(" | ")[2]: ln for ln in printed.splitlines() if ln.startswith("| digits |")}
    assert sorted(lines) == ["clip", "clip-clean", "scan-filter"]
    assert lines["scan-filter"].startswith(
        f"| digits | 5% | scan-filter | 1 | {100 * row['zero_shot']:.1f} |"
    )
    # the robustness benchmark's report tables the rows beside its own
    assert br.main(["--out", str(runs.parent), "--report"]) == 0
    assert "| digits | 5% | scan-filter | 1 |" in capsys.readouterr().out


def test_drop_fraction_outside_zero_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bs.parse_args(["--retrain", "--drop-fraction", "1.5"])
    assert "--drop-fraction must be above 0 and below 1" in capsys.readouterr().err


def test_retrain_with_a_checkpoint_trains_no_clip_and_keeps_a_saved_floor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--checkpoint: that model is scanned; a clip-clean row in --runs-dir is not trained again."""
    first = tmp_path / "first"
    assert bs.main(["--quick", "--out", str(first), "--threads", "1"]) == 0
    runs = tmp_path / "runs"
    runs.mkdir()
    floor = {"dataset": "digits", "seed": 0, "rate": 0.05, "variant": "clip-clean"}
    floor |= {"zero_shot": 0.5, "targeted_asr": 0.0, "backdoor_asr": 0.0}
    (runs / "digits-s0-r0.05-clip-clean.json").write_text(json.dumps(floor))
    checkpoint = first / "digits-s0-r0.05" / "clip.pt"
    argv = ["--quick", "--out", str(tmp_path / "out"), "--threads", "1", "--retrain", "--floor"]
    assert bs.main([*argv, "--checkpoint", str(checkpoint), "--runs-dir", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in runs.iterdir()} == {
        "digits-s0-r0.05-clip-clean.json",
        "digits-s0-r0.05-scan-filter.json",
    }
    assert json.loads((runs / "digits-s0-r0.05-clip-clean.json").read_text()) == floor
    assert "| digits | 5% | clip-clean | 1 | 50.0 |" in printed
    assert "| digits | 5% | clip |" not in printed
