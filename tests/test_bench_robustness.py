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
            _row(0, "roclip", 0.85, targeted=0.0, backdoor=0.02)
            | {"purity_by_epoch": {"5": 0.6, "7": 0.7}, "zero_shot_by_epoch": {"5": 0.5, "7": 0.8}},
        ],
    )
    assert br.main(["--out", str(tmp_path), "--report"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("3 saved runs in ")
    lines: dict[str, str] = {}  # the main table's line of each variant (it comes first)
    for line in printed.splitlines():
        if "| mnist |" in line:
            lines.setdefault(line.split(" | ")[2], line)
    assert lines["clip"].startswith("| mnist | 0.1% | clip | 2 | 91.0 ± 1.4 |")
    assert lines["roclip"].startswith("| mnist | 0.1% | roclip | 1 | 85.0 |")
    assert "| 0.0 |" in lines["roclip"] and "| 2.0 |" in lines["roclip"]
    # and the per-matching-epoch table, for the run that matched
    assert "| mnist | 0.1% | roclip | 1 | 5: 60 / 50, 7: 70 / 80 |" in printed
    assert (tmp_path / "report.md").read_text().count("| mnist |") == 3
    assert len(json.loads((tmp_path / "report.json").read_text())["rows"]) == 3


def _result(matching: dict) -> dict:
    """A run's result as the demo runner returns it, with what row_of reads."""
    return {
        "extra": {"dataset": "mnist", "seed": 0, "rate": 0.001},
        "name": "robust",
        "final": {"zero_shot": {"accuracy": 0.9}},
        "matching": matching,
        "per_epoch": {"1": {"zero_shot": 0.8}, "2": {"zero_shot": 0.85}},
        "train_seconds": 10.0,
        "pairs_per_second": 1.0,
    }


def test_a_row_keeps_the_split_recall_of_each_attack_and_the_table_shows_it() -> None:
    epoch = {"purity": None, "risk_recall": 0.9, "risk_recall_targeted": 0.8}
    row = br.row_of(_result({"2": epoch | {"risk_recall_backdoor": 1.0}, "3": epoch}))
    assert row["risk_recall_targeted"] == pytest.approx(0.8)
    assert row["risk_recall_backdoor"] == pytest.approx(1.0)  # the epoch without it is skipped
    assert row["risk_recall_by_epoch"]["3"] == {
        "risk_recall": 0.9, "risk_recall_targeted": 0.8, "risk_recall_backdoor": None
    }  # fmt: skip
    header = br.table([row | {"zero_shot": 0.9}]).splitlines()[0]
    assert "| split R | split R targeted | split R backdoor | purity |" in header
    # rows saved before these figures existed: no such columns
    assert "split R targeted" not in br.table([_row(0, "robust", 0.8)])


def test_report_without_saved_runs_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no saved runs in .*run the grid first"):
        br.main(["--out", str(tmp_path), "--report"])


def test_verdict_reads_attack_success_at_its_floor() -> None:
    """Two figures under the floor tie; a candidate lower only below the floor does not win."""
    rows = [
        _row(0, "robust", 0.80, targeted=0.0, backdoor=0.30),
        _row(0, "roclip", 0.80, targeted=0.2, backdoor=0.10),
        _row(0, "floor", 0.80, targeted=0.0, backdoor=0.35),
    ]
    verdict = br.cell_verdict(rows, "robust", "roclip")
    assert verdict is not None and verdict["beats"]  # 30% and 10% both read as the 35% floor
    rows[2]["backdoor_asr"] = 0.05  # with a lower floor, 30% against 10% is a loss
    assert not br.cell_verdict(rows, "robust", "roclip")["beats"]


def test_verdict_reads_each_recipe_at_its_own_floor_unless_one_is_named() -> None:
    """robust-light at floor-light, robust at floor: a shared floor would hide the difference."""
    rows = [
        _row(0, "robust-light", 0.80, targeted=0.0, backdoor=0.10),
        _row(0, "robust", 0.80, targeted=0.0, backdoor=0.05),
        _row(0, "floor-light", 0.80, targeted=0.0, backdoor=0.12),
        _row(0, "floor", 0.80, targeted=0.0, backdoor=0.02),
    ]
    own = br.cell_verdict(rows, "robust-light", "robust")
    assert own["floors"] == ("floor-light", "floor")
    assert own["backdoor_asr"]["floor"] == pytest.approx(0.12)
    assert own["backdoor_asr"]["incumbent_floor"] == pytest.approx(0.02)
    assert not own["beats"]  # 10% reads as its floor's 12%, against robust's 5%
    shared = br.cell_verdict(rows, "robust-light", "robust", "floor-light")
    assert shared["floors"] == ("floor-light", "floor-light") and shared["beats"]
    assert br.floor_of("robust-eda") == "floor-eda" and br.floor_of("robust-x") == "floor"
    # a recipe whose own floor was not run is read at the default's
    unrun = [r | {"variant": "robust-eda"} if r["variant"] == "robust-light" else r for r in rows]
    unrun = [r for r in unrun if r["variant"] != "floor-light"]
    assert br.floor_of("robust-eda", unrun) == "floor"
    fallback = br.cell_verdict(unrun, "robust-eda", "robust")
    assert fallback["floors"] == ("floor", "floor")
    assert fallback["backdoor_asr"]["floor"] == pytest.approx(0.02)
    table, ok = br.verdict_table(rows, "robust-light", "robust")
    assert not ok
    assert "| 0 (floor 0; 0) | 0.0 / 0.0 / 0.0, 0.0 | 10.0 / 5.0 / 12.0, 2.0 |" in table
    # a cell without floor-light is read at floor, and its row says so under a mixed header
    other = [r | {"dataset": "fashion-mnist"} for r in rows if r["variant"] != "floor-light"]
    table, _ = br.verdict_table(rows + other, "robust-light", "robust")
    assert "| targeted robust-light / robust / floor-light, floor |" in table
    assert "| fashion-mnist | 0.1% | 0 (floor 0; 0 at floor) | 0.0 / 0.0 / 0.0, 0.0 |" in table
    assert "| mnist | 0.1% | 0 (floor 0; 0) |" in table


def test_verdict_compares_means_over_shared_seeds_and_zero_shot_as_measured() -> None:
    rows = [
        _row(0, "robust", 0.80, targeted=0.0, backdoor=0.0),
        _row(1, "robust", 0.70, targeted=0.0, backdoor=0.0),
        _row(0, "roclip", 0.76, targeted=0.5, backdoor=0.5),
        _row(1, "roclip", 0.75, targeted=0.5, backdoor=0.5),
        _row(2, "roclip", 0.10, targeted=0.5, backdoor=0.5),  # no robust seed 2: left out
    ]
    verdict = br.cell_verdict(rows, "robust", "roclip")
    assert verdict["seeds"] == [0, 1]
    assert verdict["zero_shot"]["incumbent"] == pytest.approx(0.755)
    assert not verdict["beats"]  # 75.0 against 75.5: lower zero-shot, however small
    table, ok = br.verdict_table(rows)
    assert not ok and "| mnist | 0.1% | 0,1 (floor none) |" in table and table.endswith("| no |")
    assert br.cell_verdict(rows[2:], "robust", "roclip") is None


def test_another_trigger_is_saved_and_tabled_apart(tmp_path: Path) -> None:
    args = br.parse_args(["--trigger", "wanet", "--datasets", "mnist", "--seeds", "0"])
    args.rates, args.ablations, args.beyond = [0.001], [], []
    cells = {cell for cell, _ in br.plan(args, br.base_settings(args))}
    assert [c.key for c in cells] == ["mnist-s0-r0.001-wanet"]
    blend, wanet = _row(0, "clip", 0.9), _row(0, "clip", 0.5) | {"trigger": "wanet"}
    lines = [line for line in br.table([blend, wanet]).splitlines() if "| clip |" in line]
    assert [line.split(" | ")[0] for line in lines] == ["| mnist", "| mnist (wanet)"]
    with pytest.raises(SystemExit):
        br.parse_args(["--trigger", "stripes"])


def test_every_variant_builds_a_valid_config() -> None:
    """A misspelt field or value in a variant would fail hours into a grid; here it fails now."""
    from roclip_plugin.config import RoClipConfig

    for name, (flags, _) in br.VARIANTS.items():
        if flags is None:
            continue
        fields = {k: v for k, v in flags.items() if k != "preset"}
        config = RoClipConfig.from_preset(flags.get("preset", "default"), **fields)
        assert all(getattr(config, k) == v for k, v in fields.items()), name


def test_the_augmentation_variants_differ_from_robust_in_augmentation_only() -> None:
    from roclip_plugin.config import RoClipConfig

    robust = RoClipConfig.from_preset("robust").to_dict()
    for name, changed in (
        ("robust-eda", {"text_aug"}),
        ("robust-noimg", {"text_aug", "image_aug"}),
        ("robust-noaug", {"image_aug"}),
        ("floor-eda", {"text_aug"}),
        ("robust-light", {"image_aug"}),
        ("floor-light", {"image_aug"}),
        ("floor", set()),
    ):
        flags = {k: v for k, v in br.VARIANTS[name][0].items() if k != "preset"}
        config = RoClipConfig.from_preset("robust", **flags).to_dict()
        assert {k for k in robust if robust[k] != config[k]} == changed, name
    # the saved rows of robust-eda and floor-eda were trained with EDA captions
    assert br.VARIANTS["robust-eda"][0]["text_aug"] == br.VARIANTS["floor-eda"][0]["text_aug"]
    assert br.VARIANTS["robust-light"][0]["image_aug"] == br.VARIANTS["floor-light"][0]["image_aug"]
    assert {"floor", "floor-eda", "floor-light"} <= set(br.CLEAN_ONLY)


def test_each_floor_is_its_recipe_on_the_clean_rows() -> None:
    """A floor that drifts from its recipe, or trains on the poison, reads attack success at
    the wrong baseline; a recipe trained on the clean rows would read none at all."""
    pairs = {"robust": "floor", **br.FLOOR_OF}
    pairs.pop("scan-filter")  # bench_scan.py's workflow: plain CLIP retrained, its floor clip's
    for recipe, floor in pairs.items():
        assert floor in br.CLEAN_ONLY and recipe not in br.CLEAN_ONLY, recipe
        assert br.VARIANTS[recipe] == br.VARIANTS[floor], (recipe, floor)
    assert br.floor_of("robust-d02") == "floor-d02"


def test_report_compares_a_candidate_with_an_incumbent_by_the_default_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(
        tmp_path,
        [
            _row(0, "robust", 0.80, targeted=0.1, backdoor=0.2),
            _row(0, "robust-eda", 0.84, targeted=0.05, backdoor=0.1),
            _row(0, "floor-eda", 0.80, targeted=0.0, backdoor=0.15),
            _row(0, "roclip", 0.75, targeted=0.3, backdoor=0.3),
        ],
    )
    argv = ["--out", str(tmp_path), "--report", "--compare", "robust-eda", "robust"]
    assert br.main(argv) == 0
    printed = capsys.readouterr().out
    assert "robust-eda against robust:" in printed
    # robust-eda read at its own floor (floor-eda, seed 0), robust at floor (none saved)
    assert "| targeted robust-eda / robust / floor-eda, floor |" in printed
    assert (
        "| mnist | 0.1% | 0 (floor 0; none) | 5.0 / 10.0 / 0.0, - | 10.0 / 20.0 / 15.0, - "
        "| 84.0 / 80.0 | yes |" in printed
    )
    # both read at floor-eda's 15% backdoor: 10% and 20% are 15% and 20%, still a win
    assert br.main([*argv, "--floor", "floor-eda"]) == 0
    assert (
        "| mnist | 0.1% | 0 (floor 0) | 5.0 / 10.0 / 0.0 | 10.0 / 20.0 / 15.0 | 84.0 / 80.0 | yes |"
        in capsys.readouterr().out
    )
    with pytest.raises(SystemExit, match=r"--floor: no saved run of floor-x in .*saved variants"):
        br.main([*argv, "--floor", "floor-x"])
    with pytest.raises(
        SystemExit, match=r"--compare: no saved run of robust20 in .*saved variants"
    ):
        br.main(["--out", str(tmp_path), "--report", "--compare", "robust20", "robust"])
    with pytest.raises(SystemExit, match="--compare and --floor go with --report"):
        br.main(["--out", str(tmp_path), "--compare", "robust-eda", "robust"])
    with pytest.raises(SystemExit, match="--compare and --floor go with --report"):
        br.main(["--out", str(tmp_path), "--floor", "floor-eda"])


def test_gradient_clipping_reaches_every_run_and_is_saved_with_its_row(tmp_path: Path) -> None:
    args = br.parse_args(["--quick", "--out", str(tmp_path), "--grad-clip-norm", "1"])
    base = br.base_settings(args)
    cell = br.Cell("digits", 0, 0.05)
    s, poisoned = br.prepare(cell, base, tmp_path)
    clipped = br.spec_for(cell, "robust", s, poisoned, br.VARIANTS, tmp_path, 1, 1.0)
    plain = br.spec_for(cell, "robust", s, poisoned, br.VARIANTS, tmp_path, 1)
    assert clipped.train.grad_clip_norm == 1.0 and plain.train.grad_clip_norm is None
    assert clipped.train == br.replace(plain.train, grad_clip_norm=1.0)


@pytest.mark.parametrize(("saved", "flag"), [(None, ["--grad-clip-norm", "1"]), (1.0, [])])
def test_a_folder_holds_runs_of_one_gradient_clipping(tmp_path: Path, saved, flag) -> None:
    """The table compares every saved run of a cell: another recipe goes to another --out."""
    (tmp_path / "runs").mkdir()
    row = {**_row(0, "clip", 0.9), "grad_clip_norm": saved}
    (tmp_path / "runs" / "mnist-s0-r0.001-clip.json").write_text(json.dumps(row))
    with pytest.raises(SystemExit, match="give its value, or another --out"):
        br.main(["--quick", "--out", str(tmp_path), *flag])
    assert not (tmp_path / "data").exists()  # refused before any work


def test_a_clipping_limit_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit):
        br.parse_args(["--grad-clip-norm", "-1"])
    assert "--grad-clip-norm -1.0: give a number > 0" in capsys.readouterr().err
