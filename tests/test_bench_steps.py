"""benchmarks/bench_steps.py: runs of the grid traced step by step, and how their dips are read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_steps as bs  # noqa: E402


def _trace(accuracies: list[float], per_class: list[list[float]] | None = None) -> dict:
    """Readings every 10 steps; each class reads the overall accuracy unless given."""
    return {
        10 * (i + 1): {"accuracy": a, "per_class": (per_class or [[a, a, a]] * len(accuracies))[i]}
        for i, a in enumerate(accuracies)
    }


def test_a_dip_is_its_fall_below_the_best_readings_before_it() -> None:
    trace = _trace([0.5, 0.8, 0.82, 0.4, 0.6, 0.85, 0.84])
    found = dict(bs.dips(trace, start_step=0, window=2))
    assert found[40] == pytest.approx(42.0)  # 0.82 two readings before, then 0.40
    assert found[50] == pytest.approx(22.0)  # still below 0.82, one reading later
    assert found[20] == found[30] == found[60] == 0.0
    assert found[70] == pytest.approx(1.0)
    assert 10 not in found  # the first reading has nothing before it
    assert dict(bs.dips(trace, start_step=40, window=2)).keys() == {50, 60, 70}


def test_the_summary_names_the_worst_dip_and_the_classes_it_took() -> None:
    per_class = [[0.8, 0.8, 0.8], [0.9, 0.9, 0.8], [0.2, 0.85, 0.78], [0.9, 0.9, 0.8]]
    trace = _trace([0.8, 0.87, 0.6, 0.87], per_class)
    summary = bs.summarize(trace, steps_per_epoch=10, after_epoch=1, window=5)
    assert summary["readings"] == 3 and summary["worst_step"] == 30
    assert summary["worst"] == pytest.approx(27.0)
    assert (summary["over_10"], summary["over_20"]) == (1, 1)
    assert summary["lowest"] == pytest.approx(60.0)
    assert [c for c, _ in summary["classes_lost"]] == [0, 1, 2]
    assert summary["classes_lost"][0][1] == pytest.approx(70.0)
    assert bs.summarize(trace, steps_per_epoch=10, after_epoch=4, window=5) == {"readings": 0}


def test_the_epoch_fall_is_the_largest_drop_between_epoch_ends() -> None:
    per_epoch = {"1": {"zero_shot": 0.5}, "3": {"zero_shot": 0.55}, "2": {"zero_shot": 0.7}}
    assert bs.epoch_fall(per_epoch) == pytest.approx(15.0)  # epoch 2 to 3, in epoch order
    assert bs.epoch_fall({"1": {"zero_shot": 0.5}}) == 0.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "robust", "nope"], "--variants nope: not one of"),
        (["--every", "0"], "--every 0: give 1 or more"),
        (["--grad-clip-norm", "0"], "--grad-clip-norm 0.0: give a number > 0"),
    ],
)
def test_bad_arguments_name_the_flag(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        bs.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_quick_trace_saves_the_readings_and_resumes_without_training_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--quick", "--out", str(tmp_path), "--jobs", "1", "--every", "3"]
    argv += ["--variants", "clip", "robust", "--after-epoch", "0"]
    assert bs.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [
        line for line in printed.splitlines() if line.startswith("| clip") or "| robust" in line
    ]
    assert len(rows) == 2 and all(len(row.strip("| ").split(" | ")) == 9 for row in rows)
    folder = tmp_path / "steps" / "digits-s0-r0.05" / "robust"
    run = json.loads((folder / "run.json").read_text())
    steps = 2 * run["steps_per_epoch"]  # the quick cell's two epochs
    trace = json.loads((folder / "trace.json").read_text())
    assert sorted(map(int, trace)) == list(range(3, steps + 1, 3))
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["per_class"]) == 10 for r in trace.values())
    stamp = (folder / "run.json").stat().st_mtime_ns
    assert bs.main(argv) == 0  # finished runs are read back, not trained again
    assert (folder / "run.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == printed


def test_clipping_and_clean_rows_change_the_spec_and_name_the_run(tmp_path: Path) -> None:
    def spec(*flags: str, variant: str = "robust"):
        args = bs.parse_args(["--quick", "--out", str(tmp_path), "--variants", variant, *flags])
        return bs._cell_spec(args, variant)[1]

    plain = spec()
    assert not plain.clean_only and plain.train.grad_clip_norm is None
    assert plain.run_dir == tmp_path / "steps" / "digits-s0-r0.05" / "robust"
    traced = spec("--clean", "--grad-clip-norm", "1")
    assert traced.clean_only and traced.train.grad_clip_norm == 1.0
    assert traced.run_dir.name == "robust-gc1-clean"
    assert traced.train == bs.replace(plain.train, grad_clip_norm=1.0)  # nothing else changes
    assert spec(variant="floor").clean_only  # a floor trains on the clean rows anyway
