"""``roclip data`` and ``roclip poison`` never damage what they wrote before, and refuse bad
input before any work with one line naming the flag."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from roclip_kit.attack.poison import poison_dataset
from roclip_kit.attack.tables import Columns
from roclip_kit.data.datasets import build_captioned_dataset

from .tiny import run_roclip


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden staging folders beside it excluded) and its hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def roclip(argv: list[str], capsys) -> tuple[int, str]:
    """``roclip ARGV`` in-process with the kit; exit code and everything printed."""
    result = run_roclip(argv)
    return result.code, result.output


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "data"
    build_captioned_dataset("digits", out, train_limit=200, test_limit=50, image_size=24)
    return out


@pytest.fixture
def poisoned(dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "poisoned"
    poison_dataset(
        out,
        dataset_dir=dataset,
        targets=2,
        captions_per_target=5,
        backdoor_count=4,
        backdoor_class="one",
    )
    return out


class FailingTrigger:
    """A trigger that breaks on its third image, as a corrupt file or a full disk would."""

    kind = "failing"

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, image):
        self.calls += 1
        if self.calls == 3:
            raise OSError(28, "No space left on device")
        return image

    def to_dict(self):
        return {"kind": self.kind}


def test_failed_poison_rerun_leaves_the_previous_output_intact(dataset, poisoned) -> None:
    before = snapshot(poisoned)
    with pytest.raises(OSError, match="No space left"):
        poison_dataset(
            poisoned,
            dataset_dir=dataset,
            backdoor_count=6,
            backdoor_class="two",
            trigger=FailingTrigger(),
        )
    assert snapshot(poisoned) == before
    assert [p.name for p in poisoned.parent.iterdir()] == ["poisoned"]  # no staging left
    manifest = json.loads((poisoned / "manifest.json").read_text())
    for row in manifest["rows"]:
        if row["attack"] == "backdoor":
            assert (poisoned / "images" / "backdoor" / f"row-{row['row']:07d}.png").is_file()


def test_successful_rerun_replaces_the_output_whole(dataset, poisoned) -> None:
    old = set(snapshot(poisoned))
    result = poison_dataset(poisoned, dataset_dir=dataset, backdoor_count=3, backdoor_class="two")
    images = {p for p in snapshot(poisoned) if p.startswith("images/backdoor/")}
    assert len(images) == 3 and images != {p for p in old if p.startswith("images/backdoor/")}
    for line in (poisoned / "train.csv").read_text().splitlines()[1:]:
        assert Path(line.split("\t")[0]).is_file()  # every row names an existing image
    assert result.manifest["poisoned_csv"] == str(poisoned / "train.csv")
    assert oct(poisoned.stat().st_mode & 0o777) != oct(0o700)


def test_corrupt_backdoor_image_names_the_row_and_keeps_the_output(
    dataset, poisoned, tmp_path, capsys
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    lines = (copy / "train.csv").read_text().splitlines()
    for i, line in enumerate(lines[1:]):  # every training image is now a text file
        fields = line.split("\t")
        broken = copy / f"broken-{i}.png"
        broken.write_text("not an image")
        lines[i + 1] = "\t".join([str(broken), *fields[1:]])
    (copy / "train.csv").write_text("\n".join(lines) + "\n")
    before = snapshot(poisoned)
    code, out = roclip(
        [
            "poison",
            "--dataset",
            str(copy),
            "--out",
            str(poisoned),
            "--backdoor-count",
            "2",
            "--backdoor-class",
            "one",
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in out
    assert "data row" in out and "cannot be read" in out
    assert snapshot(poisoned) == before


def test_non_image_target_is_refused(dataset, tmp_path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    lines = (copy / "test.csv").read_text().splitlines()
    note = copy / "note.txt"
    note.write_text("hello")
    lines[1:] = ["\t".join([str(note), *line.split("\t")[1:]]) for line in lines[1:]]
    (copy / "test.csv").write_text("\n".join(lines) + "\n")
    code, out = roclip(
        [
            "poison",
            "--dataset",
            str(copy),
            "--out",
            str(tmp_path / "o"),
            "--targets",
            "1",
            "--captions-per-target",
            "3",
        ],
        capsys,
    )
    assert code == 2 and "a target)" in out and "note.txt" in out and "cannot be read" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--separator", ""], "argument --separator: expected a value, got ''"),
        (["--separator", "ab"], "--separator 'ab': give one character"),
        (["--trigger", "wanet", "--wanet-strength", "inf"], "wanet strength must be a positive"),
        (["--trigger", "wanet", "--wanet-strength", "50"], "--wanet-strength 50.0 moves pixels"),
        (["--patch-size", "1000"], "--patch-size 1000 gives a 24-pixel patch"),
        (["--patch-size", "1.0"], "use at most 12 pixels or a fraction up to 0.5"),
        (["--trigger", "blend", "--blend-alpha", "1"], "--blend-alpha 1.0 makes the images"),
        (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
        (["--trigger-seed", "-3"], "--trigger-seed must be a non-negative integer, got -3"),
        (["--captions-per-target", ""], "argument --captions-per-target: expected integers"),
        (["--img-key", "title"], "--img-key, --caption-key and --label-key name one column"),
    ],
)
def test_bad_poison_values_are_one_line_and_keep_the_output(
    dataset, poisoned, capsys, extra, message
) -> None:
    before = snapshot(poisoned)
    argv = [
        "poison",
        "--dataset",
        str(dataset),
        "--out",
        str(poisoned),
        "--backdoor-count",
        "2",
        "--backdoor-class",
        "one",
        *extra,
    ]
    if "--captions-per-target" in extra:
        argv += ["--targets", "1"]
    code, out = roclip(argv, capsys)
    assert code == 2 and "Traceback" not in out
    assert message in out
    assert snapshot(poisoned) == before


def test_captions_that_outnumber_the_data_are_refused(dataset, tmp_path, capsys) -> None:
    code, out = roclip(
        [
            "poison",
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path / "o"),
            "--targets",
            "2",
            "--captions-per-target",
            "10000",
        ],
        capsys,
    )
    assert code == 2 and "makes 20000 poisoned pairs, more than the 200 clean" in out


def test_repeated_captions_are_said(dataset, tmp_path, capsys) -> None:
    code, out = roclip(
        [
            "poison",
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path / "o"),
            "--targets",
            "1",
            "--captions-per-target",
            "100",
        ],
        capsys,
    )
    assert code == 0 and "distinct captions of class" in out and "captions repeat" in out


@pytest.mark.parametrize("command", ["data", "poison"])
def test_out_that_is_a_file_or_holds_foreign_files(dataset, tmp_path, capsys, command) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me too")
    tail = (
        ["--dataset", "digits", "--train-limit", "20", "--test-limit", "10"]
        if command == "data"
        else ["--dataset", str(dataset), "--backdoor-count", "1", "--backdoor-class", "one"]
    )
    code, out = roclip([command, "--out", str(a_file), *tail], capsys)
    assert code == 2 and f"--out {a_file} is a file, not a directory" in out
    code, out = roclip([command, "--out", str(a_file / "sub"), *tail], capsys)
    assert code == 2 and "is a file, not a directory" in out
    code, out = roclip([command, "--out", str(foreign), *tail], capsys)
    assert code == 2 and "holds files not written by roclip" in out and "thesis.tex" in out
    assert a_file.read_text() == "keep me" and (foreign / "thesis.tex").read_text() == "keep me too"
    code, out = roclip([command, "--out", "", *tail], capsys)
    assert code == 2 and "argument --out: an empty path" in out


def test_poison_refuses_an_out_that_holds_its_inputs(dataset, tmp_path, capsys) -> None:
    code, out = roclip(
        [
            "poison",
            "--csv",
            str(dataset / "train.csv"),
            "--classes",
            str(dataset / "classes.json"),
            "--out",
            str(dataset.parent),
            "--backdoor-count",
            "1",
            "--backdoor-class",
            "one",
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in out
    assert f"--out {dataset.parent} would overwrite the input {dataset / 'train.csv'}" in out


def test_failed_data_rebuild_leaves_the_previous_build(tmp_path, monkeypatch) -> None:
    import roclip_kit.data.datasets as datasets

    out = tmp_path / "d"
    build_captioned_dataset("digits", out, train_limit=20, test_limit=10)
    before = snapshot(out)
    real = datasets._write_split

    def fail_on_test(split, *args, **kwargs):
        if split == "test":
            raise KeyboardInterrupt
        return real(split, *args, **kwargs)

    monkeypatch.setattr(datasets, "_write_split", fail_on_test)
    with pytest.raises(KeyboardInterrupt):
        build_captioned_dataset("digits", out, train_limit=30, test_limit=10)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    monkeypatch.setattr(datasets, "_write_split", real)
    info = build_captioned_dataset("digits", out, train_limit=30, test_limit=10)
    assert info.train_count == 30 and not info.reused
    for line in (out / "train.csv").read_text().splitlines()[1:]:
        assert Path(line.split("\t")[0]).is_file() and str(out) in line


def test_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    code, out = roclip(
        ["data", "--dataset", "digits", "--out", str(tmp_path / "d"), "--train-limit", "20"],
        capsys,
    )
    assert code == 2 and "Traceback" not in out
    assert f"--out {tmp_path / 'd'}: cannot write in {tmp_path} (Permission denied)" in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_one_line(tmp_path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, out = roclip(
            ["data", "--dataset", "digits", "--out", str(locked / "d"), "--train-limit", "20"],
            capsys,
        )
    finally:
        locked.chmod(0o755)
    assert code == 2 and "is not writable" in out


def test_byte_order_mark_is_not_part_of_the_header(dataset, tmp_path) -> None:
    own = tmp_path / "bom.csv"
    own.write_text("\ufeff" + (dataset / "train.csv").read_text(), encoding="utf-8")
    result = poison_dataset(
        tmp_path / "o",
        csv_path=own,
        classes=dataset / "classes.json",
        backdoor_count=1,
        backdoor_class="one",
    )
    assert result.backdoor_rows


def test_columns_refuse_a_separator_the_csv_module_cannot_use() -> None:
    for bad in ("", "ab", '"', "\n"):
        with pytest.raises(ValueError, match="--separator"):
            Columns(separator=bad)


def test_dataset_that_is_a_file(tmp_path, capsys) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("x")
    code, out = roclip(
        [
            "poison",
            "--dataset",
            str(a_file),
            "--out",
            str(tmp_path / "o"),
            "--backdoor-count",
            "1",
            "--backdoor-class",
            "one",
        ],
        capsys,
    )
    assert code == 2 and f"--dataset {a_file} is a file" in out


def test_image_loader_still_reads_pngs(dataset) -> None:
    path = next((dataset / "images" / "train").iterdir())
    with Image.open(path) as image:
        assert image.size == (24, 24)


def test_keeping_restores_on_failure_and_after_a_killed_run(tmp_path) -> None:
    from roclip_kit.outputs import PREVIOUS, keeping

    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "a.txt").write_text("complete")
    (out / "results.json").write_text("complete")
    with pytest.raises(RuntimeError):
        with keeping(out, ("runs", "results.json")):
            assert not (out / "runs").exists()
            (out / "runs").mkdir()
            (out / "runs" / "partial.txt").write_text("half")
            raise RuntimeError("training crashed")
    assert snapshot(out) == {"results.json": snapshot(out)["results.json"], "runs/a.txt": ANY}
    assert (out / "runs" / "a.txt").read_text() == "complete" and not (out / PREVIOUS).exists()
    # a run killed outright: its partial parts beside the previous output in .previous
    (out / PREVIOUS).mkdir()
    os.rename(out / "runs", out / PREVIOUS / "runs")
    os.rename(out / "results.json", out / PREVIOUS / "results.json")
    (out / "runs").mkdir()
    (out / "runs" / "partial.txt").write_text("half")
    with keeping(out, ("runs", "results.json")):
        assert (out / PREVIOUS / "runs" / "a.txt").read_text() == "complete"
        assert (out / PREVIOUS / "results.json").read_text() == "complete"
        (out / "runs").mkdir()
        (out / "runs" / "b.txt").write_text("new")
    assert sorted(snapshot(out)) == ["runs/b.txt"] and not (out / PREVIOUS).exists()


class _Any:
    def __eq__(self, other) -> bool:
        return True


ANY = _Any()
