"""``roclip demo`` end to end on scikit-learn's digits (no download), and its pieces."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn")

import roclip_kit.plugin  # noqa: E402
from rich.console import Console  # noqa: E402
from roclip_kit.commands.demo import results_table  # noqa: E402
from roclip_kit.demo.settings import PLOT_FILE, RESULTS_FILE, SCALES, DemoSettings  # noqa: E402

from roclip_plugin import get_plugin_manager  # noqa: E402
from roclip_plugin.cli import main  # noqa: E402


def test_scale_fills_only_what_is_not_given() -> None:
    # the default preset (robust) keeps its own schedule: only the augmentation is scaled
    s = DemoSettings(epochs=3, roclip_flags={"pool_size": 64}).resolved()
    cpu = SCALES["cpu"]
    assert s.epochs == 3 and s.train_limit == cpu["train_limit"] and s.model == cpu["model"]
    assert s.roclip_flags == {"pool_size": 64, "image_aug": cpu["image_aug"]}
    paper = DemoSettings(epochs=3, roclip_flags={"preset": "paper", "pool_size": 64}).resolved()
    assert paper.roclip_flags == {
        "preset": "paper",
        "pool_size": 64,
        "first_defended_epoch": cpu["first_defended_epoch"],
        "defend_every": cpu["defend_every"],
        "image_aug": cpu["image_aug"],
    }


def test_reference_preset_keeps_the_authors_schedule() -> None:
    s = DemoSettings(roclip_flags={"preset": "reference"}).resolved()
    cpu = SCALES["cpu"]
    assert s.roclip_flags == {
        "preset": "reference",
        "pool_size": cpu["pool_size"],
        "image_aug": cpu["image_aug"],
    }


def test_unknown_scale_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--scale 'huge'"):
        DemoSettings(scale="huge").resolved()


def _pm():
    pm = get_plugin_manager(autoload=False)
    pm.register(roclip_kit.plugin)
    return pm


def test_bad_roclip_flag_fails_before_any_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--dataset", "digits", "--out", str(out), "--roclip-defend-every", "0"]
    assert main(argv, pm=_pm()) == 2
    assert "--roclip-defend-every" in capsys.readouterr().out
    assert not out.exists()


def test_a_search_setting_the_faiss_matcher_would_ignore_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--dataset", "digits", "--out", str(out), "--roclip-matcher", "faiss-ivf"]
    assert main([*argv, "--roclip-match-chunk-size", "64"], pm=_pm()) == 2
    assert "--roclip-match-chunk-size 64: --roclip-matcher faiss-ivf" in capsys.readouterr().out
    assert not out.exists()


def test_gpu_scale_on_a_cpu_is_refused(tmp_path: Path, capsys) -> None:
    argv = ["demo", "--scale", "gpu", "--out", str(tmp_path / "d")]
    assert main(argv, pm=_pm()) == 2
    assert "--scale gpu" in capsys.readouterr().out and not (tmp_path / "d").exists()


def test_openclip_trainer_end_to_end_on_digits(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    argv = [
        "demo", "--trainer", "openclip", "--dataset", "digits", "--out", str(out),
        "--train-limit", "160",
        "--test-limit", "60", "--epochs", "2", "--batch-size", "32", "--model", "tiny-cpu",
        "--targets", "2", "--captions-per-target", "4", "--backdoor-rate", "0.05",
        "--backdoor-class", "seven", "--roclip-first-defended-epoch", "1",
        "--roclip-defend-every", "1", "--roclip-pool-size", "64",
    ]  # fmt: skip
    assert main(argv, pm=_pm()) == 0
    printed = capsys.readouterr().out
    assert "CLIP" in printed and "RoCLIP" in printed and "targeted" in printed
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["poison"] == {
        "targets": 2,
        "captions_per_target": 4,
        "backdoor_rows": 8,
        "backdoor_rate": 8 / 160,
        "backdoor_class": "seven",
        "trigger": "patch",
        "poisoned_rows": 16,
    }
    clip, roclip = results["runs"]
    assert (clip["name"], clip["roclip"], roclip["name"], roclip["roclip"]) == (
        "CLIP", False, "RoCLIP", True
    )  # fmt: skip
    assert clip["defended_epochs"] == [] and roclip["defended_epochs"] == [2]
    for run in (clip, roclip):
        assert sorted(run["per_epoch"]) == ["1", "2"]
        summary = run["summary"]
        for key in ("zero_shot", "linear_probe", "targeted_asr", "backdoor_asr"):
            assert 0.0 <= summary[key] <= 1.0
        assert run["final"]["targeted"]["targets"] == 2
    assert clip["summary"]["detection_precision"] is None
    detection = roclip["final"]["detection"][-1]
    assert detection["poisoned"] == 16 and detection["k"] == 16
    assert 0.0 <= roclip["summary"]["detection_recall"] <= 1.0
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensor_trainer_end_to_end_on_digits(tmp_path: Path, capsys) -> None:
    """The default trainer, two runs side by side in worker processes."""
    out = tmp_path / "demo"
    argv = [
        "demo", "--dataset", "digits", "--out", str(out), "--train-limit", "300",
        "--test-limit", "60", "--epochs", "3", "--batch-size", "32", "--targets", "4",
        "--captions-per-target", "2,3", "--backdoor-rate", "0.05", "--backdoor-class", "seven",
        "--roclip-preset", "paper", "--roclip-first-defended-epoch", "1",
        "--roclip-defend-every", "2", "--roclip-pool-size", "64", "--jobs", "2",
        "--eval-limit", "40",
    ]  # fmt: skip
    assert main(argv, pm=_pm()) == 0
    printed = capsys.readouterr().out
    assert "RoCLIP epoch 2 (matching): zero-shot" in printed and "matching purity" in printed
    assert "RoCLIP: trained; final evaluation on the whole test split" in printed
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["poison"]["captions_per_target"] == [2, 3]
    assert results["settings"]["trainer"] == "tensor" and results["settings"]["jobs"] == 2
    clip, roclip = results["runs"]
    assert clip["defended_epochs"] == [] and roclip["defended_epochs"] == [2]
    assert sorted(roclip["matching"]) == ["2"] and 0.0 <= roclip["matching"]["2"]["purity"] <= 1
    for run in (clip, roclip):
        assert sorted(run["per_epoch"]) == ["1", "2", "3"]
        assert run["final"]["zero_shot"]["images"] == 60 - 4  # the 4 targets are left out
        assert run["final"]["zero_shot"]["targets_left_out"] == 4
        assert sorted(run["summary"]["targeted_by_captions"]) == ["2", "3"]
        assert run["pairs_per_second"] > 0
    detection = roclip["final"]["detection"][-1]
    assert detection["poisoned"] == 4 * 2 // 2 + 4 * 3 // 2 + 15
    assert (out / "runs" / "roclip" / "final.pt").is_file()
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_table_fits_80_columns_and_cuts_no_cell() -> None:
    """The widest figures a demo prints (every column filled, 100.0/100.0% detection, a
    five-digit time, a long run name) fit 80 columns with no cell cut to an ellipsis."""
    results = {
        "dataset": {"name": "fashion-mnist", "train": 60000},
        "poison": {"poisoned_rows": 1060, "targets": 32, "captions_per_target": [10, 50],
                   "backdoor_rate": 0.001},
        "runs": [
            {"name": name, "roclip": roclip, "defended_epochs": epochs, "train_seconds": 12345.4,
             "summary": {"zero_shot": 0.9712, "linear_probe": 0.98, "targeted_asr": 0.875,
                         "backdoor_asr": 1.0, "purity": purity, "detection_precision": precision,
                         "detection_recall": recall}}
            for name, roclip, epochs, purity, precision, recall in (
                ("CLIP", False, [], None, None, None),
                ("RoCLIP (robust)", True, [5, 7, 9], 0.932, 1.0, 1.0),
            )
        ],
    }  # fmt: skip
    console = Console(width=80, record=True)
    console.print(results_table(results))
    text = console.export_text()
    assert "97.1%" in text and "87.5%" in text and "100.0/100.0%" in text and "93.2%" in text
    assert "12345" in text and "targeted" in text and "purity" in text
    assert "epochs 5, 7, 9" in text
    assert "\u2026" not in text  # rich's ellipsis: a cut cell
    assert max(len(line) for line in text.splitlines()) <= 80


def _run(name: str, roclip: bool, zero_shot: float, targeted: float, backdoor: float):
    from roclip_kit.demo.report import RunFigures

    final = {
        "zero_shot": {"accuracy": zero_shot},
        "targeted": {"success_rate": targeted},
        "backdoor": {"success_rate": backdoor},
    }
    return RunFigures(name, roclip, 1.0, 1.0, [], {}, final)


def test_verdict_calls_a_collapsed_defense_a_failure() -> None:
    from roclip_kit.demo.report import verdicts

    clip = _run("CLIP", False, 0.66, 1.0, 0.12)
    notes = verdicts([clip, _run("RoCLIP", True, 0.12, 0.125, 0.0)])
    assert len(notes) == 1 and "not robustness" in notes[0] and "54.0 points" in notes[0]
    notes = verdicts([clip, _run("RoCLIP", True, 0.64, 0.125, 0.2)])
    assert notes == [
        "RoCLIP cut targeted attack success from 100.0% to 12.5% with clean zero-shot within "
        "5 points",
        "the backdoor attack did not take hold on CLIP (12.0%): this run cannot show a defense "
        "against it",
    ]
    notes = verdicts([_run("CLIP", False, 0.9, 0.9, 0.95), _run("RoCLIP", True, 0.88, 1.0, 1.0)])
    assert notes == [
        "RoCLIP did not cut targeted attack success (90.0% for CLIP, 100.0%)",
        "RoCLIP did not cut backdoor attack success (95.0% for CLIP, 100.0%)",
    ]


def test_verdict_when_clip_never_learned_the_task() -> None:
    from roclip_kit.demo.report import verdicts

    notes = verdicts([_run("CLIP", False, 0.13, 0.5, 0.0), _run("RoCLIP", True, 0.10, 0.0, 0.0)])
    assert len(notes) == 1 and "did not learn the task" in notes[0] and "chance 10%" in notes[0]


def _must_not_run(*args, **kwargs):
    raise AssertionError("the demo started its work on bad input")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "0"], "--epochs: invalid value 0; allowed: an integer >= 1"),
        (["--batch-size", "0"], "--batch-size: invalid value 0; allowed: an integer >= 1"),
        (["--train-limit", "-3"], "--train-limit: invalid value -3; allowed: an integer >= 1"),
        (["--eval-limit", "0"], "--eval-limit: invalid value 0; allowed: an integer >= 1"),
        (["--jobs", "0"], "--jobs: invalid value 0; allowed: an integer >= 1"),
        (["--targets", "-1"], "--targets: invalid value -1; allowed: an integer >= 0"),
        (["--seed", "-1"], "--seed: invalid value -1; allowed: an integer >= 0"),
        (["--lr", "0"], "--lr: invalid value 0.0; allowed: a number in (0.0, 10.0]"),
        (["--lr", "nan"], "--lr: invalid value nan; allowed: a number in (0.0, 10.0]"),
        (
            ["--attribute-rate", "2"],
            "--attribute-rate: invalid value 2.0; allowed: a number in [0.0, 1.0]",
        ),
        (
            ["--backdoor-rate", "1"],
            "--backdoor-rate: invalid value 1.0; allowed: a number in [0.0, 1.0)",
        ),
        (["--captions-per-target", "0"], "--captions-per-target 0: every count must be"),
        (["--backdoor-class", "eleven"], "--backdoor-class 'eleven': choose one of zero"),
        (["--model", "tiny-cpu"], "--model 'tiny-cpu' is not a model preset of --trainer tensor"),
        (
            ["--trainer", "openclip", "--model", "tensor-cpu"],
            "--model 'tensor-cpu' is not a model preset of --trainer openclip",
        ),
        (["--trainer", "openclip", "--jobs", "2"], "--jobs 2: --trainer openclip trains one run"),
        (["--trainer", "openclip", "--epochs", "0"], "--epochs: invalid value 0"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
    ],
)
def test_bad_sizes_are_refused_not_rewritten(tmp_path, capsys, monkeypatch, extra, message):
    import roclip_kit.demo.run

    monkeypatch.setattr(roclip_kit.demo.run, "build_data", _must_not_run)
    out = tmp_path / "demo"
    assert main(["demo", "--dataset", "digits", "--out", str(out), *extra], pm=_pm()) == 2
    printed = capsys.readouterr().out
    assert message in " ".join(printed.split()) and "Traceback" not in printed
    assert not out.exists()


def test_out_that_is_a_file_or_a_foreign_folder(tmp_path, capsys, monkeypatch) -> None:
    import roclip_kit.demo.run

    monkeypatch.setattr(roclip_kit.demo.run, "build_data", _must_not_run)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert main(["demo", "--out", str(a_file)], pm=_pm()) == 2
    assert f"--out {a_file} is a file, not a directory" in capsys.readouterr().out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["demo", "--out", str(mine)], pm=_pm()) == 2
    assert "holds files not written by roclip demo (notes.txt)" in capsys.readouterr().out
    assert (mine / "notes.txt").read_text() == "keep"


def test_failed_rerun_puts_the_previous_results_back(tmp_path, monkeypatch) -> None:
    import roclip_kit.demo.run
    from roclip_kit.demo.run import run_demo

    out = tmp_path / "demo"
    for name, text in (
        ("poisoned/manifest.json", "old"),
        ("runs/clip/final.pt", "old"),
        (RESULTS_FILE, "{}"),
        (PLOT_FILE, "png"),
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = {p: p.read_text() for p in out.rglob("*") if p.is_file()}

    class Info:
        name, train_count, test_count, root, classes = "digits", 10, 5, out / "data", ["a"]

    def new_poison(s, dataset, folder, **kw):
        folder.mkdir()
        (folder / "manifest.json").write_text("new")
        return None

    def crash(*args, **kwargs):
        (out / "runs" / "clip").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(roclip_kit.demo.run, "build_data", lambda *a, **k: Info())
    monkeypatch.setattr(roclip_kit.demo.run, "poison", new_poison)
    monkeypatch.setattr(roclip_kit.demo.run, "train_tensor_runs", crash)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoSettings(out=out, dataset="digits", epochs=1))
    after = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    assert after == before and not (out / ".previous").exists()


def _plotted_runs():
    from roclip_kit.demo.report import RunFigures

    figures = {"backdoor_asr": 0.2, "zero_shot": 0.5}
    per_epoch = {e: {"targeted_asr": 0.1 * e, **figures} for e in (1, 2)}
    clip = RunFigures("CLIP", False, 1.0, 1.0, [], per_epoch, {})
    roclip = RunFigures("RoCLIP", True, 1.0, 1.0, [2], per_epoch, {}, {2: {"purity": 0.75}})
    return [clip, roclip]


def test_demo_plot_shows_attack_success_zero_shot_and_purity(tmp_path: Path, monkeypatch) -> None:
    import roclip_kit.demo.report as demo

    charts = []
    monkeypatch.setattr(demo, "draw_chart", lambda chart, path: charts.append(chart) or path)
    assert demo.plot_attack_success(_plotted_runs(), tmp_path / PLOT_FILE, "digits") is not None
    (chart,) = charts
    labels = {s.label: s for s in chart.series}
    assert set(labels) == {
        f"{run} {kind}"
        for run in ("CLIP", "RoCLIP")
        for kind in ("targeted", "backdoor", "zero-shot")
    } | {"RoCLIP matching purity"}
    assert labels["RoCLIP matching purity"].values == {2: 0.75}
    assert labels["CLIP targeted"].values == {1: pytest.approx(0.1), 2: pytest.approx(0.2)}
    assert list(chart.shaded_epochs) == [2]
    assert chart.y_label == "share of images" and "all test images" in chart.x_label
    demo.plot_attack_success(_plotted_runs(), tmp_path / PLOT_FILE, "digits", eval_images=1000)
    assert "checked on 1,000 test images" in charts[-1].x_label
    assert chart.shade_label == "RoCLIP matching"  # the label when the caller names none
    demo.plot_attack_success(
        _plotted_runs(), tmp_path / PLOT_FILE, "digits", shade_label="RoCLIP defended"
    )
    assert charts[-1].shade_label == "RoCLIP defended"


def test_demo_without_matplotlib_skips_the_plot_and_says_how_to_get_it(
    tmp_path: Path, monkeypatch
) -> None:
    import roclip_kit.demo.report as demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    stale = tmp_path / PLOT_FILE
    stale.write_bytes(b"an older run's plot")
    said: list[str] = []
    assert demo.plot_attack_success(_plotted_runs(), stale, "digits", say=said.append) is None
    assert not stale.exists()  # never taken for this run's
    assert len(said) == 1 and "pip install matplotlib" in said[0]


def test_run_bars_count_each_runs_epochs_and_final_evaluation_and_the_whole_demo() -> None:
    """The bars' time-left estimate covers the final evaluation: it is one more unit."""
    import io

    from rich.progress import Progress
    from roclip_kit.demo.run import RunBars

    progress = Progress(console=Console(file=io.StringIO()))
    bars = RunBars(progress, ["CLIP", "RoCLIP"], epochs=3)
    by_name = {task.description: task for task in progress.tasks}
    assert by_name["train CLIP"].total == 4 and by_name["whole demo"].total == 8
    for _ in range(3):
        bars.advance("CLIP")
    bars.evaluating("CLIP")
    bars.advance("CLIP")
    bars.advance("unknown run")  # an event of a run without a bar changes nothing
    by_name = {task.description: task for task in progress.tasks}
    assert by_name["evaluate CLIP"].completed == 4 and by_name["whole demo"].completed == 4
    bars.close()
    assert progress.tasks == []
    RunBars(None, ["CLIP"], epochs=3).advance("CLIP")  # no display: nothing to do


def test_a_failed_rerun_with_other_data_options_leaves_the_earlier_images(
    tmp_path, monkeypatch
) -> None:
    """Other data options build into their own cache folder: when that rerun fails, the
    results put back still point at images that exist; a rerun that succeeds drops the rest."""
    import roclip_kit.demo.run
    from roclip_kit.demo.run import data_folder, run_demo

    out = tmp_path / "demo"
    first = DemoSettings(out=out, dataset="digits", epochs=1, train_limit=100)
    second = replace(first, train_limit=50)
    assert data_folder(first, out) != data_folder(second, out)
    assert data_folder(first, out) == data_folder(replace(first, epochs=3), out)
    old_image = data_folder(first, out) / "images" / "0.png"
    old_image.parent.mkdir(parents=True)
    old_image.write_text("old image")
    (out / "poisoned").mkdir()
    (out / "poisoned" / "train.csv").write_text(f"filepath\n{old_image}\n")

    class Info:
        name, train_count, test_count, classes = "digits", 10, 5, ["a"]

    def build(s, folder, **kw):
        folder.mkdir(parents=True, exist_ok=True)
        return Info()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(roclip_kit.demo.run, "build_data", build)
    monkeypatch.setattr(roclip_kit.demo.run, "_poison_train_evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        run_demo(second)
    assert old_image.read_text() == "old image"
    assert (out / "poisoned" / "train.csv").read_text().endswith(f"{old_image}\n")
    monkeypatch.setattr(roclip_kit.demo.run, "_poison_train_evaluate", lambda *a, **k: {})
    run_demo(second)
    assert not old_image.exists() and len(list((out / "data").iterdir())) == 1


def test_the_scales_pool_is_fitted_to_a_small_dataset_and_a_given_pool_is_kept() -> None:
    """Digits at the cpu scale: 1,347 images plus 960 targeted rows; the scale's 4,096-caption
    pool would be 178% of an epoch (a warning, and images matched to their own captions)."""
    from roclip_kit.demo.run import epoch_pairs, fit_pool

    from roclip_plugin.checks import pool_share_message
    from roclip_plugin.config import RoClipConfig

    s = DemoSettings(dataset="digits").resolved()
    pairs = epoch_pairs(s, 1347)
    assert pairs == 1347 + 16 * 10 + 16 * 50
    # the paper's matching is what a large pool harms (drop never hands a caption back)
    s = DemoSettings(dataset="digits", roclip_flags={"preset": "paper"}).resolved()
    pairs = epoch_pairs(s, 1347)
    config = RoClipConfig.from_preset("paper", pool_size=s.roclip_flags["pool_size"])
    assert pool_share_message(config, pairs) is not None
    said: list[str] = []
    fitted = fit_pool(s, config, pairs, say=said.append)
    size = fitted.roclip_flags["pool_size"]
    assert size == 128 and pool_share_message(replace(config, pool_size=size), pairs) is None
    assert said and "pool size 128" in said[0] and "--roclip-pool-size" in said[0]
    assert fit_pool(s, config, 100_000, say=said.append) is s  # a pool that fits is kept


def test_a_preset_that_drops_says_defended_not_matched() -> None:
    """robust re-pairs no caption: its epochs and table say "defended"; paper's say "matched"."""
    from roclip_kit.demo.run import _epoch_line
    from roclip_kit.demo.settings import defense_verb

    line = {"run": "RoCLIP", "epoch": 2, "zero_shot": 0.5, "matching": True}
    assert "epoch 2 (defended):" in _epoch_line(line | {"action": "drop"})
    assert "epoch 2 (matching):" in _epoch_line(line | {"action": "match"})
    assert "(" not in _epoch_line(line | {"matching": False, "action": "drop"}).split(":")[0]
    robust = {"pool_size": 64}  # the default preset
    paper = {"preset": "paper", "pool_size": 64}
    assert (defense_verb(robust), defense_verb(paper)) == ("defended", "matched")
    assert defense_verb({"preset": "no-such-preset"}) == "defended"  # another version's file
