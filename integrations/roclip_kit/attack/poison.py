"""Poison a dataset in OpenCLIP's CSV format: targeted poisoning and backdoors (RoCLIP paper).

The input is a training CSV with an image, a caption and a label column, plus a classes.json
(``{"classes": [...]}`` at least), e.g. a directory built by :mod:`roclip_kit.data.datasets` or a
user's own data. The output directory holds:

- ``train.csv``: the poisoned training set, same columns and separator. Clean rows keep their
  place and their exact text (relative image paths stay relative); backdoored rows are changed
  in place; targeted rows are appended at the end (OpenCLIP shuffles every epoch, so their
  place does not matter, and every clean row keeps its index).
- ``manifest.json``: what was poisoned (format ``roclip-poison/1``, see :mod:`roclip_kit.files`).
- ``images/backdoor/``: the triggered copies of the backdoored images.
- ``classes.json`` and, when known, ``test.csv``: copies, so the output is itself a dataset
  directory (``--dataset OUT``) for training and evaluation.

Poisoned rows get the label of the class their caption names (the adversarial or backdoor
target class); the images' true labels stay in the source CSV under the same row index (and in
the manifest for targets). Targeted rows reference the held-out target image files directly.
Everything is drawn from ``seed``.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roclip_kit.attack.choose import (
    _backdoor_size,
    caption_counts,
    choose_backdoor_rows,
    choose_targets,
    class_index,
    sample_captions,
)
from roclip_kit.attack.tables import Columns, Table, read_table
from roclip_kit.attack.triggers import BlendTrigger, PatchTrigger, WaNetTrigger
from roclip_kit.files import (
    CLASSES_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    TEST_CSV,
    TRAIN_CSV,
    Target,
    read_classes,
    read_image,
    resolve_image,
)
from roclip_kit.outputs import check_replaceable, replacing
from roclip_plugin.io import check_output_dir

DEFAULT_CAPTIONS_PER_TARGET = 100
BACKDOOR_DIR = "backdoor"
WRITTEN = (TRAIN_CSV, TEST_CSV, CLASSES_FILE, MANIFEST_FILE, "images")  # what --out holds
# A trigger beyond these replaces most of the image, so the poisoned sample is no longer an
# image of its class with a trigger on it (a 1000-pixel patch on 32-pixel digits is noise).
MAX_PATCH_SHARE = 0.5  # patch side, as a share of the image's shorter side
MAX_BLEND_ALPHA = 0.5  # more noise than image beyond this
MAX_WANET_STRENGTH = 10.0  # mean displacement strength / 2 pixels: 5 px at this bound


@dataclass
class PoisonResult:
    """Where the poisoned dataset lies and which rows were changed."""

    out_dir: Path
    csv: Path
    manifest_path: Path
    manifest: dict[str, Any]
    targeted_rows: list[int] = field(default_factory=list)
    backdoor_rows: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_out(out: Path, sources: list[Path]) -> Path:
    """``out`` resolved, refused when it cannot be replaced as a whole (see roclip_kit.outputs).

    Inputs inside ``out`` are refused first, by name: replacing the output would delete them
    (``--out`` the dataset folder itself would otherwise be called a folder of foreign files).
    """
    resolved = check_output_dir(out, "--out").resolve()
    for source in sources:
        if source.resolve().is_relative_to(resolved):
            raise ValueError(
                f"--out {resolved} would overwrite the input {source}: choose a new directory"
            )
    return check_replaceable(
        out, "--out", "roclip poison", WRITTEN, lambda d: (d / MANIFEST_FILE).is_file()
    )


def check_trigger_fits(trigger: Any, width: int, height: int, where: str) -> None:
    """Refuse a trigger that would replace most of a ``width`` x ``height`` image.

    The backdoor's poisoned rows must stay images of their class with a trigger on them;
    clipped to the image, an oversized patch (or a heavy blend or warp) turns them into noise
    that teaches nothing about the trigger.
    """
    if isinstance(trigger, PatchTrigger):
        side, limit = trigger.side(width, height), int(MAX_PATCH_SHARE * min(width, height))
        if side > max(limit, 1):
            raise ValueError(
                f"--patch-size {trigger.size} gives a {side}-pixel patch on the {width}x{height} "
                f"image of {where}, which replaces most of it: use at most {max(limit, 1)} "
                f"pixels or a fraction up to {MAX_PATCH_SHARE}"
            )
    elif isinstance(trigger, BlendTrigger) and trigger.alpha > MAX_BLEND_ALPHA:
        raise ValueError(
            f"--blend-alpha {trigger.alpha} makes the images more noise than picture: use at "
            f"most {MAX_BLEND_ALPHA} (0.1 to 0.2 is typical)"
        )
    elif isinstance(trigger, WaNetTrigger) and trigger.strength > MAX_WANET_STRENGTH:
        raise ValueError(
            f"--wanet-strength {trigger.strength} moves pixels by {trigger.strength / 2:g} on "
            f"average, destroying the image: use at most {MAX_WANET_STRENGTH:g} (WaNet: 0.5)"
        )


def _stamp(
    table: Table, rows: list[int], trigger: Any, out: Path, staging: Path, progress: Any
) -> dict[int, str]:
    """Triggered copies (PNG) of the images of ``rows`` in ``staging``; returns their paths.

    The paths are those under ``out``, where ``staging`` is moved once everything is written.
    """
    folder = staging / "images" / BACKDOOR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    task = progress.add_task("stamping triggers", total=len(rows)) if progress else None
    paths = {}
    for row in rows:
        where = f"{table.path}, data row {row}"
        cell = table.cell(row, table.columns.image)
        source = resolve_image(cell, table.path, must_exist=True, absolute=True)
        image = read_image(source, where)
        check_trigger_fits(trigger, image.width, image.height, where)
        name = f"row-{row:07d}.png"
        trigger.apply(image).save(folder / name)
        paths[row] = str(out / "images" / BACKDOOR_DIR / name)
        if task is not None:
            progress.advance(task)
    return paths


def _write_csv(path: Path, header: list[str], rows: list[list[str]], separator: str) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter=separator, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


@dataclass(frozen=True)
class Inputs:
    """The resolved input files of a poisoning run."""

    train_csv: Path
    classes: Path
    test_csv: Path | None
    dataset_dir: Path | None


def resolve_inputs(
    dataset_dir: str | Path | None,
    csv_path: str | Path | None,
    classes: str | Path | None,
    test_csv: str | Path | None,
) -> Inputs:
    """Input files from ``--dataset DIR`` or ``--csv`` + ``--classes`` (+ ``--test-csv``).

    ``--csv`` with ``--dataset`` is refused: it used to replace the directory's ``train.csv``
    silently, so a user believing the directory's data were poisoned got another file's.
    """
    if dataset_dir is not None and csv_path is not None:
        raise ValueError(
            f"--csv {csv_path} and --dataset {dataset_dir} both name the training CSV; give "
            "--dataset DIR alone, or --csv FILE with --classes FILE (and --test-csv FILE)"
        )
    if dataset_dir is not None:
        root = Path(dataset_dir).expanduser().resolve()
        if root.is_file():
            raise ValueError(f"--dataset {root} is a file; give the dataset's directory")
        if not root.is_dir():
            raise ValueError(f"--dataset {root}: directory not found")
        train = root / TRAIN_CSV
        cls = Path(classes) if classes else root / CLASSES_FILE
        if test_csv is None:  # the directory's own test.csv, when it has one
            default = root / TEST_CSV
            return Inputs(
                train.resolve(), cls.resolve(), default if default.is_file() else None, root
            )
        return Inputs(train.resolve(), cls.resolve(), Path(test_csv).resolve(), root)
    if csv_path is None or classes is None:
        raise ValueError("give --dataset DIR, or --csv FILE with --classes FILE")
    test = Path(test_csv).resolve() if test_csv else None
    return Inputs(Path(csv_path).resolve(), Path(classes).resolve(), test, None)


@dataclass
class _Job:
    """State shared by the steps of one poisoning run."""

    inputs: Inputs
    train: Table
    names: list[str]
    out: Path
    rows: list[list[str]]
    manifest_rows: list[dict[str, Any]] = field(default_factory=list)
    staging: Path | None = None  # where the files go until they replace ``out``
    notes: list[str] = field(default_factory=list)  # what the user should know of the result

    def set_row(self, row: list[str], image: str, caption: str, label: int) -> None:
        """Put image, caption and label (in the CSV's own label style) into ``row``."""
        cols = self.train.columns
        row[self.train.index(cols.image)] = image
        row[self.train.index(cols.caption)] = caption
        text = str(label) if self.train.numeric_labels else self.names[label]
        row[self.train.index(cols.label)] = text

    def caption_pool(self, label: int, flag: str) -> list[str]:
        """Clean training captions of a class, to dress poisoned pairs as real data."""
        col = self.train.index(self.train.columns.caption)
        pool = [
            r[col] for r, y in zip(self.train.rows, self.train.labels, strict=True) if y == label
        ]
        if not pool:
            raise ValueError(
                f"{flag} {self.names[label]!r}: {self.train.path} has no row of that class to "
                "take captions from"
            )
        return pool


def poison_dataset(
    out_dir: str | Path,
    *,
    dataset_dir: str | Path | None = None,
    csv_path: str | Path | None = None,
    classes: str | Path | None = None,
    test_csv: str | Path | None = None,
    targets: int = 0,
    captions_per_target: int | Sequence[int] = DEFAULT_CAPTIONS_PER_TARGET,
    adversarial_class: str | int | None = None,
    target_rows: list[int] | None = None,
    backdoor_count: int | None = None,
    backdoor_rate: float | None = None,
    backdoor_class: str | int | None = None,
    trigger: Any = None,
    seed: int = 0,
    columns: Columns | None = None,
    progress: Any = None,
) -> PoisonResult:
    """Write a poisoned copy of a training CSV, its new images and the manifest.

    Args:
        out_dir: output directory (see the module docstring for its contents).
        dataset_dir: a captioned dataset directory (train.csv, test.csv, classes.json), or:
        csv_path: the training CSV, with ``classes`` (classes.json) and, for targeted
            poisoning, ``test_csv`` (the held-out rows targets are taken from).
        classes: classes.json (default: the dataset directory's).
        test_csv: held-out CSV (default: the dataset directory's test.csv).
        targets: number of targeted-poisoning targets (0: none) drawn from the held-out CSV.
        captions_per_target: poisoned pairs per target (100 in the RoCLIP paper), or a list
            of counts splitting the targets into equal groups (``[10, 50]``).
        adversarial_class: the class every target is pushed to (default: one drawn per
            target among the other classes).
        target_rows: explicit 0-based held-out rows to use as targets.
        backdoor_count: rows to backdoor; or ``backdoor_rate``, a fraction of training rows.
        backdoor_rate: see ``backdoor_count`` (exactly one of them for a backdoor).
        backdoor_class: the class the trigger should evoke (needed for a backdoor).
        trigger: a trigger object (default: a ``PatchTrigger`` with ``seed``).
        seed: draws targets, adversarial classes, captions and backdoored rows.
        columns: CSV column names and separator (default: filepath, title, label; tab).
        progress: an optional ``rich.progress.Progress``.
    """
    wants_targets = bool(targets or target_rows)
    wants_backdoor = backdoor_count is not None or backdoor_rate is not None
    _check_request(targets, wants_targets, wants_backdoor, backdoor_class, captions_per_target)
    _check_seed(seed)
    if trigger is not None and not wants_backdoor:
        raise ValueError(
            "a trigger was given without a backdoor: add --backdoor-count or --backdoor-rate"
        )
    columns = columns or Columns()
    inputs = resolve_inputs(dataset_dir, csv_path, classes, test_csv)
    sources = [p for p in (inputs.train_csv, inputs.test_csv, inputs.classes) if p]
    out = _check_out(Path(out_dir), sources)
    names = read_classes(inputs.classes, need_templates=False).names
    train = read_table(inputs.train_csv, columns, names, "--csv")
    job = _Job(inputs, train, names, out, [list(r) for r in train.rows])
    plan = None
    if wants_backdoor:  # every choice is made and checked before anything is written
        count = _backdoor_size(backdoor_count, backdoor_rate, len(job.rows))
        plan = _choose_backdoor(job, count, backdoor_class, np.random.default_rng([seed, 1]))
    targeted = None
    if wants_targets:
        targeted = _targeted(
            job,
            targets,
            target_rows,
            adversarial_class,
            captions_per_target,
            np.random.default_rng([seed, 0]),
        )
    with replacing(out, "--out") as staging:  # the old output stays intact until the end
        job.staging = staging
        backdoor = None
        if plan is not None:
            backdoor = _backdoor(job, plan, trigger or PatchTrigger(seed=seed), progress)
        result = _finish(job, seed, targeted, backdoor)
    return result


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")


def _check_request(
    targets: Any, wants_targets: bool, wants_backdoor: bool, backdoor_class: Any, per_target: Any
) -> None:
    if isinstance(targets, bool) or not isinstance(targets, int) or targets < 0:
        raise ValueError(f"--targets must be a non-negative integer, got {targets!r}")
    if not wants_targets and not wants_backdoor:
        raise ValueError(
            "nothing to poison: give --targets N (or --target-rows) and/or --backdoor-count N "
            "or --backdoor-rate R"
        )
    counts = [per_target] if isinstance(per_target, int) else per_target
    if wants_targets and (
        not isinstance(counts, Sequence)
        or not counts
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts)
    ):
        raise ValueError(f"--captions-per-target must be at least 1, got {per_target!r}")
    if wants_backdoor and backdoor_class is None:
        raise ValueError("a backdoor needs --backdoor-class NAME (the class the trigger evokes)")


@dataclass(frozen=True)
class _BackdoorPlan:
    target: int
    rows: list[int]
    captions: list[str]


def _choose_backdoor(
    job: _Job, count: int, target_class: str | int, rng: np.random.Generator
) -> _BackdoorPlan:
    """The rows (not of the target class) to trigger and their new target-class captions."""
    target = class_index(target_class, job.names, "--backdoor-class")
    pool = job.caption_pool(target, "--backdoor-class")
    rows = choose_backdoor_rows(job.train.labels, target, count, rng)
    return _BackdoorPlan(target, rows, sample_captions(pool, count, rng))


def _backdoor(job: _Job, plan: _BackdoorPlan, trigger: Any, progress: Any) -> dict[str, Any]:
    """Stamp the trigger on the planned rows' images and recaption them, in place."""
    assert job.staging is not None
    paths = _stamp(job.train, plan.rows, trigger, job.out, job.staging, progress)
    for row, caption in zip(plan.rows, plan.captions, strict=True):
        job.set_row(job.rows[row], paths[row], caption, plan.target)
        job.manifest_rows.append({"row": row, "attack": "backdoor", "target": None})
    return {
        "target_class": job.names[plan.target],
        "target_label": plan.target,
        "count": len(plan.rows),
        "rate": len(plan.rows) / len(job.train.rows),
        "trigger": trigger.to_dict(),
    }


def _targeted(
    job: _Job,
    count: int,
    target_rows: list[int] | None,
    adversarial_class: str | int | None,
    per_target: int | Sequence[int],
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Append rows (target image, adversarial caption) for each target: its group's count."""
    if job.inputs.test_csv is None:
        raise ValueError(
            "targeted poisoning takes its targets from held-out images: give "
            "--test-csv FILE (or --dataset DIR with a test.csv)"
        )
    test = read_table(job.inputs.test_csv, job.train.columns, job.names, "--test-csv")
    usable = sorted(set(int(y) for y in job.train.labels))
    adversarial = None
    if adversarial_class is not None:
        adversarial = class_index(adversarial_class, job.names, "--adversarial-class")
        job.caption_pool(adversarial, "--adversarial-class")  # fails early if it has none
    targets = []
    chosen = choose_targets(test, count, target_rows, adversarial, usable, rng)
    counts = caption_counts(per_target, len(chosen))
    if sum(counts) > len(job.train.rows):
        raise ValueError(
            f"--targets {len(chosen)} x --captions-per-target {per_target} makes {sum(counts)} "
            f"poisoned pairs, more than the {len(job.train.rows)} clean training rows: the "
            "result would be mostly poison, not a poisoned dataset; lower either"
        )
    for (test_row, adv), n in zip(chosen, counts, strict=True):
        cell = test.cell(test_row, job.train.columns.image)
        path = resolve_image(cell, test.path, must_exist=True, absolute=True)
        read_image(path, f"{test.path}, data row {test_row}, a target")
        targets.append(Target(test_row, path, int(test.labels[test_row]), adv, n))
        pool = job.caption_pool(adv, "--adversarial-class")
        distinct = len(set(pool))
        if n > distinct:
            job.notes.append(
                f"target {test_row}: {n} poison captions drawn from the {distinct} distinct "
                f"captions of class {job.names[adv]!r}, so captions repeat"
            )
        for caption in sample_captions(pool, n, rng):
            job.manifest_rows.append(
                {"row": len(job.rows), "attack": "targeted", "target": test_row}
            )
            row = [""] * len(job.train.header)
            job.set_row(row, path, caption, adv)
            job.rows.append(row)
    return {
        "captions_per_target": per_target if isinstance(per_target, int) else list(per_target),
        "targets": [_target_dict(t, job.names) for t in targets],
    }


def _target_dict(target: Target, names: list[str]) -> dict[str, Any]:
    return {
        "id": target.id,
        "filepath": target.filepath,
        "label": target.label,
        "adversarial_class": names[target.adversarial_label],
        "adversarial_label": target.adversarial_label,
        "captions": target.captions,
    }


def _finish(
    job: _Job, seed: int, targeted: dict[str, Any] | None, backdoor: dict[str, Any] | None
) -> PoisonResult:
    """Write the poisoned CSV, copies of classes.json and test.csv, then the manifest.

    Files go into ``job.staging``; paths written inside them are those under ``job.out``.
    """
    staging = job.staging or job.out
    poisoned = job.out / TRAIN_CSV
    _write_csv(staging / TRAIN_CSV, job.train.header, job.rows, job.train.columns.separator)
    shutil.copyfile(job.inputs.classes, staging / CLASSES_FILE)
    if job.inputs.test_csv is not None:
        shutil.copyfile(job.inputs.test_csv, staging / TEST_CSV)
    rows = sorted(job.manifest_rows, key=lambda r: r["row"])
    dataset_dir = job.inputs.dataset_dir
    manifest = {
        "format": MANIFEST_FORMAT,
        "source_csv": str(job.inputs.train_csv),
        "poisoned_csv": str(poisoned),
        "dataset_dir": str(dataset_dir) if dataset_dir else None,
        "seed": seed,
        "rows": rows,
        "targeted": targeted,
        "backdoor": backdoor,
    }
    path = job.out / MANIFEST_FILE
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return PoisonResult(
        job.out,
        poisoned,
        path,
        manifest,
        [r["row"] for r in rows if r["attack"] == "targeted"],
        [r["row"] for r in rows if r["attack"] == "backdoor"],
        list(job.notes),
    )
