"""Poisoning a CSV dataset: exactly the rows the manifest lists change, in the promised way."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from roclip_kit.attack.poison import poison_dataset
from roclip_kit.attack.tables import Columns
from roclip_kit.attack.triggers import PatchTrigger, trigger_from_dict
from roclip_kit.data.datasets import build_captioned_dataset
from roclip_kit.files import MANIFEST_FORMAT, read_manifest

NAMES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    build_captioned_dataset("digits", out, seed=0, train_limit=300, test_limit=80)
    return out


def _rows(path: Path, separator: str = "\t") -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter=separator))


def _changed(source: list[dict], poisoned: list[dict]) -> set[int]:
    """Rows of the poisoned CSV that differ from the source (appended rows included)."""
    return {i for i, row in enumerate(poisoned) if i >= len(source) or row != source[i]}


def test_targeted_rows_are_appended_with_test_images_and_adversarial_captions(
    dataset: Path, tmp_path: Path
) -> None:
    result = poison_dataset(tmp_path, dataset_dir=dataset, targets=4, captions_per_target=7)
    source, poisoned = _rows(dataset / "train.csv"), _rows(result.csv)
    test = _rows(dataset / "test.csv")
    manifest = read_manifest(result.manifest_path).data
    assert manifest["format"] == MANIFEST_FORMAT and manifest["backdoor"] is None
    assert poisoned[: len(source)] == source and len(poisoned) == len(source) + 28
    assert {r["row"] for r in manifest["rows"]} == _changed(source, poisoned)
    assert result.targeted_rows == list(range(len(source), len(source) + 28))
    targets = {t["id"]: t for t in manifest["targeted"]["targets"]}
    assert len(targets) == 4
    for target in targets.values():
        assert target["filepath"] == test[target["id"]]["filepath"]
        assert target["label"] == int(test[target["id"]]["label"])
        assert target["adversarial_label"] != target["label"]
        assert NAMES[target["adversarial_label"]] == target["adversarial_class"]
    for entry in manifest["rows"]:
        row, target = poisoned[entry["row"]], targets[entry["target"]]
        assert entry["attack"] == "targeted"
        assert row["filepath"] == target["filepath"]
        assert int(row["label"]) == target["adversarial_label"]
        assert row["title"] in {
            s["title"] for s in source if int(s["label"]) == target["adversarial_label"]
        }


def test_backdoor_changes_rows_in_place_and_only_the_patch_pixels(
    dataset: Path, tmp_path: Path
) -> None:
    trigger = PatchTrigger(size=5, position="bottom-right", seed=4)
    result = poison_dataset(
        tmp_path,
        dataset_dir=dataset,
        backdoor_count=12,
        backdoor_class="seven",
        trigger=trigger,
        seed=2,
    )
    source, poisoned = _rows(dataset / "train.csv"), _rows(result.csv)
    manifest = json.loads(result.manifest_path.read_text())
    assert len(poisoned) == len(source)
    assert {r["row"] for r in manifest["rows"]} == _changed(source, poisoned)
    assert len(result.backdoor_rows) == 12
    sevens = {s["title"] for s in source if s["label"] == "7"}
    for row in result.backdoor_rows:
        assert source[row]["label"] != "7" and poisoned[row]["label"] == "7"
        assert poisoned[row]["title"] in sevens
        before = np.asarray(Image.open(source[row]["filepath"]), dtype=int)
        after = np.asarray(Image.open(poisoned[row]["filepath"]), dtype=int)
        changed = np.any(before != after, axis=2)
        assert not changed[:-5, :].any() and not changed[:, :-5].any()
        assert changed[-5:, -5:].any()
    backdoor = manifest["backdoor"]
    assert backdoor["count"] == 12 and backdoor["rate"] == pytest.approx(12 / 300)
    assert backdoor["target_class"] == "seven" and backdoor["target_label"] == 7
    assert trigger_from_dict(backdoor["trigger"]) == trigger


def test_manifest_trigger_rebuilds_the_stamped_images(dataset: Path, tmp_path: Path) -> None:
    result = poison_dataset(
        tmp_path, dataset_dir=dataset, backdoor_rate=0.02, backdoor_class=3, seed=5
    )
    trigger = trigger_from_dict(result.manifest["backdoor"]["trigger"])
    assert trigger.kind == "patch" and trigger.position == "random"
    source, poisoned = _rows(dataset / "train.csv"), _rows(result.csv)
    assert len(result.backdoor_rows) == 6  # 2% of 300
    for row in result.backdoor_rows:
        with Image.open(source[row]["filepath"]) as original:
            expected = trigger.apply(original)
        with Image.open(poisoned[row]["filepath"]) as stamped:
            assert stamped.tobytes() == expected.tobytes()


def test_combined_attacks_do_not_overlap_and_are_deterministic(
    dataset: Path, tmp_path: Path
) -> None:
    kwargs = dict(
        dataset_dir=dataset,
        targets=3,
        captions_per_target=5,
        backdoor_count=10,
        backdoor_class="one",
        adversarial_class="two",
        seed=9,
    )
    first = poison_dataset(tmp_path / "a", **kwargs)
    second = poison_dataset(tmp_path / "b", **kwargs)
    rows = first.manifest["rows"]
    assert [r["row"] for r in rows] == sorted({r["row"] for r in rows})
    assert not set(first.targeted_rows) & set(first.backdoor_rows)
    assert len(first.targeted_rows) == 15 and len(first.backdoor_rows) == 10
    assert rows == second.manifest["rows"]
    assert first.manifest["targeted"] == second.manifest["targeted"]
    titles = [r["title"] for r in _rows(first.csv)]
    assert titles == [r["title"] for r in _rows(second.csv)]
    assert {t["adversarial_class"] for t in first.manifest["targeted"]["targets"]} == {"two"}
    other = poison_dataset(tmp_path / "c", **(kwargs | {"seed": 10}))
    assert other.manifest["rows"] != rows
    assert (tmp_path / "a" / "classes.json").is_file() and (tmp_path / "a" / "test.csv").is_file()


def test_a_rerun_into_the_same_directory_replaces_the_old_images(
    dataset: Path, tmp_path: Path
) -> None:
    poison_dataset(tmp_path, dataset_dir=dataset, backdoor_count=20, backdoor_class="one")
    poison_dataset(tmp_path, dataset_dir=dataset, backdoor_count=3, backdoor_class="one")
    assert len(list((tmp_path / "images" / "backdoor").iterdir())) == 3


def test_given_target_rows_are_used(dataset: Path, tmp_path: Path) -> None:
    test = _rows(dataset / "test.csv")
    rows = [i for i, r in enumerate(test) if r["label"] != "4"][:2]
    result = poison_dataset(
        tmp_path,
        dataset_dir=dataset,
        target_rows=rows,
        adversarial_class="four",
        captions_per_target=3,
    )
    assert [t["id"] for t in result.manifest["targeted"]["targets"]] == rows
    assert [r["target"] for r in result.manifest["rows"]] == [rows[0]] * 3 + [rows[1]] * 3


def _own_dataset(dataset: Path, folder: Path) -> tuple[Path, Path, Path]:
    """The digits data as a user's CSVs: comma separated, other column names, class names as
    labels, image paths relative to the CSV."""
    folder.mkdir()
    (folder / "pics").mkdir()
    paths = []
    for name in ("train", "test"):
        out = folder / f"{name}.csv"
        with out.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "img", "text", "y"])
            for i, row in enumerate(_rows(dataset / f"{name}.csv")):
                image = Path(row["filepath"])
                shutil.copy(image, folder / "pics" / f"{name}-{image.name}")
                label = NAMES[int(row["label"])]
                writer.writerow([i, f"pics/{name}-{image.name}", row["title"], label])
        paths.append(out)
    classes = folder / "labels.json"
    classes.write_text(json.dumps({"classes": NAMES}))
    return paths[0], paths[1], classes


def test_own_csv_with_other_columns_and_separator(dataset: Path, tmp_path: Path) -> None:
    train, test, classes = _own_dataset(dataset, tmp_path / "own")
    columns = Columns(image="img", caption="text", label="y", separator=",")
    result = poison_dataset(
        tmp_path / "out",
        csv_path=train,
        classes=classes,
        test_csv=test,
        targets=2,
        captions_per_target=4,
        backdoor_count=5,
        backdoor_class="nine",
        columns=columns,
    )
    source, poisoned = _rows(train, ","), _rows(result.csv, ",")
    assert list(poisoned[0]) == ["id", "img", "text", "y"]
    assert poisoned[0] == source[0] or 0 in result.backdoor_rows
    assert {r["row"] for r in result.manifest["rows"]} == _changed(source, poisoned)
    for row in result.backdoor_rows:
        assert poisoned[row]["y"] == "nine" and Path(poisoned[row]["img"]).is_absolute()
    for row in result.targeted_rows:
        assert poisoned[row]["id"] == "" and Path(poisoned[row]["img"]).is_file()
    assert result.manifest["dataset_dir"] is None


def test_missing_column_names_the_column_and_flag(dataset: Path, tmp_path: Path) -> None:
    train, test, classes = _own_dataset(dataset, tmp_path / "own")
    with pytest.raises(ValueError, match="has no column 'label' .*set --label-key"):
        poison_dataset(
            tmp_path / "out",
            csv_path=train,
            classes=classes,
            backdoor_count=2,
            backdoor_class="one",
            columns=Columns("img", "text", separator=","),
        )
    with pytest.raises(ValueError, match="has no column 'filepath'.*--separator"):
        poison_dataset(
            tmp_path / "out",
            csv_path=train,
            classes=classes,
            backdoor_count=2,
            backdoor_class="one",
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"backdoor_count": 2, "backdoor_class": "eleven"},
            "--backdoor-class 'eleven' is not a class of this dataset \\(valid classes: zero, one",
        ),
        ({"targets": 2, "adversarial_class": "ten"}, "--adversarial-class 'ten' is not a class"),
        (
            {"backdoor_count": 290, "backdoor_class": "one"},
            "backdoor count 290 .* exceeds the 270 training rows not of the target class",
        ),
        ({"targets": 81}, "--targets 81 exceeds the 80 usable held-out rows"),
        ({"target_rows": [80]}, "--target-rows: row 80 is outside the held-out CSV's rows 0..79"),
        ({"targets": 3, "target_rows": [1, 2]}, "--targets 3 but --target-rows lists 2 rows"),
        (
            {"backdoor_count": 2, "backdoor_rate": 0.1, "backdoor_class": "one"},
            "give exactly one of --backdoor-count and --backdoor-rate",
        ),
        ({"backdoor_rate": 1.5, "backdoor_class": "one"}, "--backdoor-rate must be in \\(0, 1\\)"),
        ({"backdoor_count": 2}, "a backdoor needs --backdoor-class NAME"),
        ({}, "nothing to poison: give --targets N"),
        ({"targets": 1, "captions_per_target": 0}, "--captions-per-target must be at least 1"),
        ({"targets": 1, "trigger": PatchTrigger()}, "a trigger was given without a backdoor"),
    ],
)
def test_bad_requests_are_named(dataset: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        poison_dataset(tmp_path / "out", dataset_dir=dataset, **kwargs)
    assert not (tmp_path / "out").exists()  # checked before anything was written


def test_target_row_of_the_adversarial_class_is_refused(dataset: Path, tmp_path: Path) -> None:
    test = _rows(dataset / "test.csv")
    row = next(i for i, r in enumerate(test) if r["label"] == "5")
    with pytest.raises(ValueError, match=f"held-out row {row} is already of the adversarial"):
        poison_dataset(tmp_path, dataset_dir=dataset, target_rows=[row], adversarial_class="five")


def test_input_files_are_checked(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--csv .*nope.csv does not exist"):
        poison_dataset(
            tmp_path / "o",
            csv_path=tmp_path / "nope.csv",
            classes=dataset / "classes.json",
            backdoor_count=1,
            backdoor_class="one",
        )
    with pytest.raises(ValueError, match="give --dataset DIR, or --csv FILE with --classes FILE"):
        poison_dataset(
            tmp_path / "o", csv_path=dataset / "train.csv", backdoor_count=1, backdoor_class="one"
        )
    with pytest.raises(ValueError, match="give\n?.*--test-csv FILE"):
        poison_dataset(
            tmp_path / "o",
            csv_path=dataset / "train.csv",
            classes=dataset / "classes.json",
            targets=1,
        )
    with pytest.raises(ValueError, match="--test-csv .*missing.csv does not exist"):
        poison_dataset(
            tmp_path / "o", dataset_dir=dataset, test_csv=tmp_path / "missing.csv", targets=1
        )
    bad = tmp_path / "classes.json"
    bad.write_text(json.dumps({"names": NAMES}))
    with pytest.raises(ValueError, match='needs a "classes" key'):
        poison_dataset(
            tmp_path / "o",
            csv_path=dataset / "train.csv",
            classes=bad,
            backdoor_count=1,
            backdoor_class="one",
        )
    with pytest.raises(ValueError, match="would overwrite the input"):
        poison_dataset(dataset, dataset_dir=dataset, backdoor_count=1, backdoor_class="one")


def test_unknown_label_in_the_csv_names_row_and_value(dataset: Path, tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    lines = (dataset / "train.csv").read_text().splitlines()
    parts = lines[3].split("\t")
    lines[3] = "\t".join(parts[:2] + ["eleven"])
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="data row 2: label 'eleven' is no class index or class"):
        poison_dataset(
            tmp_path / "o",
            csv_path=train,
            classes=dataset / "classes.json",
            backdoor_count=1,
            backdoor_class="one",
        )


def test_csv_and_dataset_together_are_refused(dataset: Path, tmp_path: Path) -> None:
    """--csv used to replace the directory's train.csv silently; the docs say one or the other."""
    other = tmp_path / "other.csv"
    other.write_bytes((dataset / "train.csv").read_bytes())
    with pytest.raises(ValueError, match="--csv .* and --dataset .* both name the training CSV"):
        poison_dataset(
            tmp_path / "o", dataset_dir=dataset, csv_path=other, backdoor_count=1,
            backdoor_class="one",
        )  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("names", [["one", "two", "one"], ["Seven", "eight", "seven"]])
def test_duplicate_class_names_are_refused(tmp_path: Path, names: list[str]) -> None:
    """Labels are read by name in any case: a repeated name makes two labels one class."""
    from roclip_kit.files import read_classes

    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": names}))
    with pytest.raises(ValueError, match=r"names .* twice \(labels 0 and 2\)"):
        read_classes(path, need_templates=False)
