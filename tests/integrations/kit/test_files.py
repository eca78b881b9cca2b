"""The kit's one reader per file (:mod:`roclip_kit.files`): classes.json, the CSVs and their
image paths, the manifest. Each reader's switches, and every refusal naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from roclip_kit.files import (
    MANIFEST_FORMAT,
    absolute_image,
    existing_image,
    load_classes,
    load_manifest,
    read_captions,
    read_classes,
    read_manifest,
    read_rows,
    resolve_image,
)

NAMES = ["zero", "one", "two", "three"]


def _json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _manifest(path: Path, **extra: object) -> Path:
    rows = [
        {"row": 5, "attack": "targeted", "target": 9},
        {"row": 2, "attack": "backdoor", "target": None},
        {"key": "s-7", "attack": "backdoor"},
    ]
    targeted = {
        "captions_per_target": 1,
        "targets": [
            {"id": 9, "filepath": "t.png", "label": 1, "adversarial_class": "three",
             "adversarial_label": 3, "captions": 1},
        ],
    }  # fmt: skip
    data = {"format": MANIFEST_FORMAT, "source_csv": "src.csv", "poisoned_csv": "p.csv",
            "rows": rows, "targeted": targeted, "backdoor": None, **extra}  # fmt: skip
    return _json(path, data)


# ---------------------------------------------------------------- classes.json


def test_classes_without_templates_need_the_switch(tmp_path) -> None:
    path = _json(tmp_path / "classes.json", {"classes": NAMES})
    with pytest.raises(ValueError, match="--template"):
        read_classes(path)
    info = read_classes(path, need_templates=False)
    assert info.names == NAMES and info.templates == [] and info.path == path
    assert read_classes(path, ["a {}"]).templates == ["a {}"]


def test_templates_present_are_checked_even_when_not_needed(tmp_path) -> None:
    path = _json(tmp_path / "classes.json", {"classes": NAMES, "templates": ["no slot"]})
    with pytest.raises(ValueError, match="exactly one"):
        read_classes(path, need_templates=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('{"names": ["a"]}', 'needs a "classes" key'),
        ('{"classes": ["a", "b", "A"], "templates": ["{}"]}', r"names 'A' twice \(labels 0"),
    ],
)
def test_bad_classes_files_are_named_with_the_flag(tmp_path, content, message) -> None:
    path = tmp_path / "mine.json"
    path.write_text(content)
    for need in (True, False):
        with pytest.raises(ValueError, match=message) as err:
            read_classes(path, need_templates=need)
        assert str(path) in str(err.value) and "--classes" in str(err.value)


# ---------------------------------------------------------------- CSV rows


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_rows_are_read_once_for_every_reader(tmp_path) -> None:
    path = _csv(tmp_path / "t.csv", "\ufefffilepath\ttitle\tlabel\na.png\ta cat\t1\n")
    assert read_rows(path) == [{"filepath": "a.png", "title": "a cat", "label": "1"}]
    assert read_captions(path) == ["a cat"]


def test_row_reader_refusals_name_the_file_and_flag(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"--csv .*nope.csv does not exist"):
        read_rows(tmp_path / "nope.csv", what="--csv")
    path = _csv(tmp_path / "t.csv", "filepath\ttitle\n")
    with pytest.raises(ValueError, match=r"t.csv has no 'label' column.*roclip_kit.files"):
        read_rows(path)
    assert read_rows(path, ("filepath",)) == []
    with pytest.raises(ValueError, match=r"test CSV \(--test-csv\) .*t.csv has a header but no"):
        read_rows(path, ("filepath",), "test CSV (--test-csv)", require_rows=True)
    comma = _csv(tmp_path / "c.csv", "filepath,title,label\n")
    with pytest.raises(ValueError, match="c.csv is not tab-separated"):
        read_rows(comma)


# ---------------------------------------------------------------- image paths


@pytest.fixture
def images(tmp_path, monkeypatch) -> Path:
    """A CSV folder holding ``beside.png``; the working directory holds ``here.png``."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "beside.png").write_bytes(b"x")
    work = tmp_path / "work"
    work.mkdir()
    (work / "here.png").write_bytes(b"x")
    monkeypatch.chdir(work)
    return folder / "train.csv"


def test_relative_paths_stay_as_found_unless_absolute_is_asked(images) -> None:
    folder = images.parent
    assert resolve_image("here.png", images) == "here.png"
    assert resolve_image("beside.png", images) == str(folder / "beside.png")
    assert resolve_image("here.png", images, absolute=True) == str(Path("here.png").resolve())
    assert resolve_image("beside.png", images, absolute=True) == str(
        (folder / "beside.png").resolve()
    )


def test_a_missing_image_is_kept_for_the_report_unless_it_must_exist(images) -> None:
    folder = images.parent
    assert resolve_image("gone.png", images) == "gone.png"  # as the CSV wrote it
    assert resolve_image("gone.png", images, absolute=True) == str((folder / "gone.png").resolve())
    absent = str(folder / "absent.png")
    assert resolve_image(absent, images) == absent
    for absolute in (False, True):
        with pytest.raises(ValueError, match=r"train.csv: image 'gone.png' not found") as err:
            resolve_image("gone.png", images, must_exist=True, absolute=absolute)
        assert os.path.join(os.getcwd(), "gone.png") in str(err.value)
    assert resolve_image("beside.png", images, must_exist=True) == str(folder / "beside.png")


# ---------------------------------------------------------------- the manifest


def test_one_read_gives_the_typed_manifest_and_its_json(tmp_path) -> None:
    path = _manifest(tmp_path / "m.json")
    classes = read_classes(_json(tmp_path / "c.json", {"classes": NAMES}), need_templates=False)
    manifest = read_manifest(path, classes)
    assert manifest.rows == {5: "targeted", 2: "backdoor"} and manifest.keys == {"s-7": "backdoor"}
    assert manifest.row_targets == {5: 9}
    assert [(t.id, t.label, t.adversarial_label) for t in manifest.targets] == [(9, 1, 3)]
    assert manifest.source_csv == Path("src.csv") and manifest.poisoned_csv == Path("p.csv")
    assert manifest.data == json.loads(path.read_text())
    assert read_manifest(path).targets == manifest.targets  # no classes: labels as written


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('{"format": "other/2"}', "has format 'other/2', expected 'roclip-poison/1'"),
        (json.dumps({"format": MANIFEST_FORMAT, "rows": [{"attack": "x"}]}), "missing an entry"),
    ],
)
def test_bad_manifests_are_named_with_the_flag(tmp_path, content, message) -> None:
    path = tmp_path / "mine.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_manifest(path)
    assert str(path) in str(err.value) and "--manifest" in str(err.value)


# ---------------------------------------------------------------- deprecated names


def test_the_old_names_warn_and_forward(tmp_path, images) -> None:
    classes = _json(tmp_path / "c.json", {"classes": NAMES})
    manifest = _manifest(tmp_path / "m.json")
    with pytest.warns(DeprecationWarning, match="read_classes"):
        assert load_classes(classes) == NAMES
    with pytest.warns(DeprecationWarning, match="read_manifest"):
        assert load_manifest(manifest)["format"] == MANIFEST_FORMAT
    with pytest.warns(DeprecationWarning, match="must_exist=True"):
        assert existing_image("here.png", images) == Path("here.png").resolve()
    with pytest.warns(DeprecationWarning, match="absolute=True"):
        assert absolute_image("gone.png", images) == str((images.parent / "gone.png").resolve())
