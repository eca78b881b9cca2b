"""``roclip data`` and ``roclip poison`` sub-commands, run as the ``roclip`` command mounts them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from rich.console import Console
from roclip_kit.commands.data import add_data_command, add_poison_command


def _run(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="roclip")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_command(sub)
    add_poison_command(sub)
    args = parser.parse_args(argv)
    console = Console(record=True, width=200)
    code = args.run(args, console)
    return code, console.export_text()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    code, text = _run(
        [
            "data",
            "--dataset",
            "digits",
            "--out",
            str(out),
            "--train-limit",
            "200",
            "--test-limit",
            "50",
            "--image-size",
            "24",
            "--seed",
            "3",
        ]
    )
    assert code == 0 and "200 / 50 images" in text and "built in" in text
    return out


def test_data_builds_then_reuses(dataset: Path) -> None:
    meta = json.loads((dataset / "classes.json").read_text())
    assert meta["build"]["image_size"] == 24 and meta["build"]["seed"] == 3
    code, text = _run(
        [
            "data",
            "--dataset",
            "digits",
            "--out",
            str(dataset),
            "--train-limit",
            "200",
            "--test-limit",
            "50",
            "--image-size",
            "24",
            "--seed",
            "3",
        ]
    )
    assert code == 0 and "digits: reused" in text


def test_poison_with_both_attacks_and_trigger_flags(dataset: Path, tmp_path: Path) -> None:
    code, text = _run(
        [
            "poison",
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path),
            "--targets",
            "2",
            "--captions-per-target",
            "6",
            "--backdoor-count",
            "4",
            "--backdoor-class",
            "seven",
            "--trigger",
            "patch",
            "--patch-size",
            "0.25",
            "--patch-position",
            "2,3",
            "--trigger-seed",
            "11",
        ]
    )
    assert code == 0
    assert "2 targets x 6 captions = 12 rows appended" in text and "4 rows" in text
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backdoor"]["trigger"] == {
        "kind": "patch",
        "size": 0.25,
        "position": [2, 3],
        "seed": 11,
    }
    assert len(manifest["rows"]) == 16


def test_poison_own_csv_with_column_flags(dataset: Path, tmp_path: Path) -> None:
    lines = (dataset / "train.csv").read_text().replace("\t", ";").splitlines()
    lines[0] = "path;caption;cls"
    own = tmp_path / "mine.csv"
    own.write_text("\n".join(lines) + "\n")
    code, _ = _run(
        [
            "poison",
            "--csv",
            str(own),
            "--classes",
            str(dataset / "classes.json"),
            "--out",
            str(tmp_path / "out"),
            "--backdoor-rate",
            "0.05",
            "--backdoor-class",
            "two",
            "--trigger",
            "blend",
            "--blend-alpha",
            "0.3",
            "--img-key",
            "path",
            "--caption-key",
            "caption",
            "--label-key",
            "cls",
            "--separator",
            ";",
        ]
    )
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["backdoor"]["count"] == 10
    assert manifest["backdoor"]["trigger"] == {"kind": "blend", "alpha": 0.3, "seed": 0}
    assert (tmp_path / "out" / "train.csv").read_text().startswith("path;caption;cls\n")


def test_tab_separator_can_be_written_as_backslash_t(dataset: Path, tmp_path: Path) -> None:
    code, _ = _run(
        [
            "poison",
            "--csv",
            str(dataset / "train.csv"),
            "--classes",
            str(dataset / "classes.json"),
            "--test-csv",
            str(dataset / "test.csv"),
            "--out",
            str(tmp_path),
            "--targets",
            "1",
            "--separator",
            "\\t",
        ]
    )
    assert code == 0 and len(json.loads((tmp_path / "manifest.json").read_text())["rows"]) == 100


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--backdoor-count", "2", "--backdoor-class", "one", "--wanet-k", "3"],
            "--wanet-k applies to --trigger wanet, not --trigger patch",
        ),
        (
            ["--targets", "1", "--patch-size", "3"],
            "backdoor options were given without --backdoor-count N or --backdoor-rate R",
        ),
        (
            ["--backdoor-count", "2", "--backdoor-class", "one", "--patch-position", "middle"],
            "patch position 'middle' is not valid",
        ),
        (
            [
                "--backdoor-count",
                "2",
                "--backdoor-class",
                "one",
                "--trigger",
                "wanet",
                "--wanet-strength",
                "0",
            ],
            "wanet strength must be a positive number",
        ),
        (["--targets", "1", "--label-key", "klass"], "no column 'klass'.*set --label-key"),
    ],
)
def test_bad_flags_raise_value_errors_that_name_them(
    dataset: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _run(["poison", "--dataset", str(dataset), "--out", str(tmp_path / "o"), *extra])


def test_unparseable_flag_values_are_argparse_errors(dataset: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        _run(["poison", "--dataset", str(dataset), "--out", "o", "--target-rows", "1,x"])
    assert "expected integers separated by commas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(
            [
                "poison",
                "--dataset",
                str(dataset),
                "--out",
                "o",
                "--backdoor-count",
                "1",
                "--backdoor-rate",
                "0.1",
            ]
        )
    assert "not allowed with argument" in capsys.readouterr().err
