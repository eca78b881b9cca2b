"""The files the kit reads and writes, in one place, so every step agrees on them.

A **captioned dataset directory** (written by :mod:`roclip_kit.data.datasets`)::

    <dir>/train.csv      tab-separated, header ``filepath  title  label``
    <dir>/test.csv       the same columns; held out (zero-shot, linear probe, attack targets)
    <dir>/classes.json   {"dataset": str, "classes": [class names, by label],
                          "templates": ["a photo of the digit {}.", ...],
                          "synonyms": {class name: [other names, ...]}, ...}
    <dir>/images/...     the PNG files; ``filepath`` holds absolute paths

Only ``classes`` is required of a user's own classes.json (``templates`` for zero-shot
evaluation). The builder also writes ``caption_templates`` (the sentence templates of the
captions), ``attributes`` ({"colors", "backgrounds", "sizes", "positions"}: the words for the
rendered attributes that captions name), ``counts`` ({"train": int, "test": int}),
``last_files`` (the last image of each split) and ``build`` (the parameters of the build:
``version``, ``source``, ``root``, ``seed``, ``train_limit``, ``test_limit``, ``image_size``;
a later build with equal ``build`` and complete files is skipped).

``train.csv`` is in OpenCLIP's CSV format (``--csv-img-key filepath --csv-caption-key title``,
OpenCLIP's default tab separator); the extra ``label`` column is ignored by OpenCLIP and lets
the kit pick captions of a class and measure accuracy. ``label`` is the class index into
``classes``.

A **poisoned dataset** is a new CSV with the same columns plus a **manifest** (JSON)::

    {"format": MANIFEST_FORMAT,
     "source_csv": str, "poisoned_csv": str, "dataset_dir": str | None, "seed": int,
     "rows": [{"row": int, "attack": "targeted" | "backdoor", "target": int | None}, ...],
     "targeted": null | {"captions_per_target": int | [int, ...],
                         "targets": [{"id": int, "filepath": str, "label": int,
                                      "adversarial_class": str, "adversarial_label": int,
                                      "captions": int}]},
     "backdoor": null | {"target_class": str, "target_label": int, "count": int,
                         "rate": float, "trigger": Trigger.to_dict()}}

The poisoning step writes it as ``manifest.json`` (``MANIFEST_FILE``) beside the poisoned
``train.csv``, a copy of ``classes.json`` and (when known) of ``test.csv``, so that output
directory is itself a captioned dataset directory. In ``rows``, ``target`` is the ``id`` of
the row's target for targeted rows (the 0-based data row of the held-out ``test.csv`` the
target image comes from) and null for backdoor rows; ``rows`` is sorted by ``row``. Poisoned
rows carry the label of the class their caption names; ``rate`` is ``count`` over the
training rows. ``captions_per_target`` is a list when the targets were split into groups of
different strengths; each target's ``captions`` is its own count.

``row`` is the 0-based data row of the poisoned CSV (the header is not a row), which is the
``index`` column of the ``suspicious_epoch_N.csv`` files the OpenCLIP adapter writes, so
detection can be scored against the manifest. A **trigger** is an object with ``kind``,
``apply(PIL.Image) -> PIL.Image`` and ``to_dict()``;
``roclip_kit.attack.triggers.trigger_from_dict`` rebuilds the identical trigger at test time.

The readers of these files live here too, one for each file: :func:`read_classes`
(``classes.json``; ``need_templates=False`` where no zero-shot prompt is built),
:func:`read_rows` (any kit CSV; :func:`read_split` and :func:`read_captions` build on it),
:func:`resolve_image` (an image path of a CSV; ``must_exist`` and ``absolute`` choose whether
a missing file is refused and whether the path comes back resolved) and
:func:`read_manifest` (the manifest, typed; checked against the classes when given).
``load_classes``, ``load_manifest``, ``existing_image`` and ``absolute_image`` are deprecated
names of these.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from roclip_plugin.io import require_file

MANIFEST_FORMAT = "roclip-poison/1"
CSV_SEPARATOR = "\t"
IMAGE_KEY = "filepath"
CAPTION_KEY = "title"
LABEL_KEY = "label"
CLASSES_FILE = "classes.json"
TRAIN_CSV = "train.csv"
TEST_CSV = "test.csv"
MANIFEST_FILE = "manifest.json"


def read_image(path: Any, where: str | None = None) -> Any:
    """A loaded PIL image in its own mode; an unreadable file raises ``ValueError`` naming it.

    ``where`` says where the file was listed (``train.csv, data row 17``), so a corrupt or
    non-image file in a CSV of 60,000 rows can be found and fixed.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        place = f" ({where})" if where else ""
        raise ValueError(
            f"image {path}{place} cannot be read ({err}); fix the file or drop its row"
        ) from None


class Trigger(Protocol):
    """A backdoor trigger: the same object (or its dict) stamps training and test images."""

    kind: str

    def apply(self, image: Any) -> Any:
        """Return a triggered copy of a PIL image (same size and mode)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters from which ``trigger_from_dict`` rebuilds this trigger."""
        ...


@dataclass(frozen=True)
class Target:
    """One target of targeted poisoning: a held-out image the attacker wants read as another class.

    ``id`` is its data row in the held-out CSV; labels index ``classes``; ``captions`` is the
    number of poisoned pairs made of it (None in manifests written before it was recorded).
    """

    id: int
    filepath: str
    label: int
    adversarial_label: int
    captions: int | None = None


# ---------------------------------------------------------------- classes.json

CLASSES_WHAT = f"classes file (--classes or --dataset DIR/{CLASSES_FILE})"


@dataclass(frozen=True)
class ClassInfo:
    """Class names by label and the zero-shot prompt templates (each with one ``{}``).

    ``templates`` is empty when the file has none and the reader was told they are not
    needed (poisoning and the tensor path read class names only).
    """

    names: list[str]
    templates: list[str]
    path: Path

    def label_of(self, value: str, where: str) -> int:
        """A label cell (class index or class name) as an index; ``where`` names the cell."""
        text = value.strip()
        lowered = [name.lower() for name in self.names]
        if text.lstrip("-").isdigit():
            label = int(text)
            if 0 <= label < len(self.names):
                return label
        elif text.lower() in lowered:
            return lowered.index(text.lower())
        raise ValueError(
            f"{where}: unknown class {value!r}: a label is a class index 0..{len(self.names) - 1}"
            f" or a class name listed in {self.path}"
        )


def read_classes(
    path: Path | str, templates: Sequence[str] | None = None, *, need_templates: bool = True
) -> ClassInfo:
    """Read ``classes.json``, the one reader of it; ``templates`` replaces its templates.

    Every step reads the file here so that all refuse the same files with the same words:
    a missing or non-JSON file, no ``classes`` list, a class named twice. ``need_templates``
    is False for the steps that never build a zero-shot prompt (poisoning, the tensor path):
    a user's own classes.json need not carry templates for them, though templates it does
    carry are still checked, since the same file goes on to evaluation.
    """
    path = Path(path)
    data = _read_json(path, CLASSES_WHAT)
    names = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f'{CLASSES_WHAT} {path} needs a "classes" key holding the class names by label '
            '(in label order), e.g. {"classes": ["cat", "dog"]}'
        )
    check_unique_names(names, path)
    chosen = list(templates) if templates else data.get("templates")
    if not chosen and not need_templates:
        return ClassInfo(list(names), [], path)
    return ClassInfo(list(names), _checked_templates(chosen, path), path)


def _checked_templates(chosen: Any, path: Path) -> list[str]:
    """The zero-shot templates, refused unless each has the one ``{}`` a class name fills."""
    if not isinstance(chosen, list) or not chosen:
        raise ValueError(
            f'{path} has no "templates" list; add prompts such as "a photo of a {{}}." or '
            "pass --template"
        )
    for template in chosen:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(
                f"template {template!r} (from {path} or --template) must contain exactly one "
                "{} where the class name goes"
            )
    return list(chosen)


def _read_json(path: Path, what: str) -> Any:
    """A JSON file's content; ``what`` (the file's role and flag) names it in refusals."""
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError of a binary file
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None


def check_unique_names(classes: list[str], path: Path) -> None:
    """Refuse a class named twice (in any case).

    CSV labels are read by name in any case, so the second label could never be written or
    read, and zero-shot would score one class against itself.
    """
    seen: dict[str, int] = {}
    for label, name in enumerate(classes):
        key = name.strip().lower()
        if key in seen:
            raise ValueError(
                f"classes file {path} names {name!r} twice (labels {seen[key]} and {label}); "
                "give every class a distinct name (--classes)"
            )
        seen[key] = label


# ---------------------------------------------------------------- CSVs and the image paths in them

KIT_COLUMNS = (IMAGE_KEY, CAPTION_KEY, LABEL_KEY)


@dataclass(frozen=True)
class Split:
    """Image paths and labels of a CSV; ``rows`` are their 0-based data rows in that CSV."""

    path: Path
    filepaths: list[str]
    labels: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.filepaths)

    def take(self, positions: np.ndarray) -> Split:
        """The items at ``positions`` (indices into this split, not CSV rows)."""
        return Split(
            self.path,
            [self.filepaths[i] for i in positions],
            self.labels[positions],
            self.rows[positions],
        )


def read_rows(
    path: Path | str,
    wanted: Sequence[str] = KIT_COLUMNS,
    what: str = "CSV file",
    *,
    require_rows: bool = False,
) -> list[dict[str, str]]:
    """The data rows of a kit CSV as dicts by column: the one reader of the kit's CSVs.

    Every reader of a CSV (splits, captions, scanned pairs, the tensor path) comes here so all
    agree on the format: tab-separated, a byte-order mark ignored, the ``wanted`` columns
    present. ``what`` names the file and its flag in refusals (``test CSV (--test-csv ...)``);
    ``require_rows`` refuses a header without rows, for readers that have nothing to do
    with an empty file. Each dict holds every header column (``None`` for a short row).
    """
    path = require_file(path, what)
    # utf-8-sig: a byte-order mark is not part of the first column's name
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=CSV_SEPARATOR)
        require_columns(path, reader.fieldnames or [], wanted)
        records = list(reader)
    if require_rows and not records:
        raise ValueError(f"{what} {path} has a header but no rows")
    return records


def read_split(path: Path | str, classes: ClassInfo, what: str = "CSV file") -> Split:
    """Image paths and labels of a CSV with ``filepath`` and ``label`` columns (OpenCLIP's).

    ``what`` names the file and its flag in messages (``test CSV (--test-csv ...)``).
    """
    records = read_rows(path, (IMAGE_KEY, LABEL_KEY), what, require_rows=True)
    path = Path(path)
    filepaths = [resolve_image(r[IMAGE_KEY] or "", path) for r in records]
    labels = [
        classes.label_of(r[LABEL_KEY] or "", f"{path} row {i}") for i, r in enumerate(records)
    ]
    n = len(filepaths)
    return Split(path, filepaths, np.asarray(labels, np.int64), np.arange(n, dtype=np.int64))


def read_captions(path: Path) -> list[str]:
    """The caption column of a training CSV, by data row."""
    return [r[CAPTION_KEY] for r in read_rows(path, (CAPTION_KEY,), "training CSV")]


def require_columns(path: Path, columns: Sequence[str], wanted: Sequence[str]) -> None:
    """Refuse a CSV without the ``wanted`` columns, or one that is not tab-separated, naming it."""
    if len(columns) == 1 and "," in columns[0]:
        raise ValueError(
            f"{path} is not tab-separated (header {columns[0]!r}); the kit's CSVs use tabs, "
            "like OpenCLIP's default --csv-separator"
        )
    for column in wanted:
        if column not in columns:
            hint = " (the class index or class name of each row)" if column == LABEL_KEY else ""
            raise ValueError(
                f"{path} has no {column!r} column{hint}; its columns are {', '.join(columns)} "
                "(the kit's CSV format: see roclip_kit.files)"
            )


def resolve_image(
    value: str, csv_path: Path, *, must_exist: bool = False, absolute: bool = False
) -> str:
    """An image path of a CSV: absolute, or relative to the working directory or to the CSV.

    OpenCLIP reads relative paths from the working directory; the CSV's folder is tried too so
    a dataset directory can be moved. The one resolver, for three needs:

    - ``must_exist``: a missing file raises ``ValueError`` naming the CSV and the image (the
      poisoner copies the file, so it must be there now); otherwise a missing file is given
      back to be reported by whoever opens it.
    - ``absolute``: the path comes back resolved (the tensor path and the poisoner record
      paths that must hold from any working directory), and a missing relative one is
      guessed beside the CSV; otherwise the path is kept as found, and a missing relative
      one as written in the CSV, so a report shows the user's own text.
    """
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [path, csv_path.parent / path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and must_exist:
        looked = path if path.is_absolute() else Path.cwd() / path
        raise ValueError(f"{csv_path}: image {value!r} not found (looked at {looked})")
    if absolute:
        return str((found or candidates[-1]).resolve())
    if found is not None or path.is_absolute():
        return str(found or path)
    return value


# ---------------------------------------------------------------- the manifest

MANIFEST_WHAT = "manifest (--manifest)"


@dataclass(frozen=True)
class Backdoor:
    """The backdoor section of a manifest: target class and the trigger's parameters."""

    target_label: int
    trigger: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    """What was poisoned: poisoned CSV rows (row -> attack), targets and the backdoor.

    ``keys`` (``__key__`` -> attack) names poisoned samples of WebDataset shards, which have
    no row index: a manifest entry gives ``"key"`` in place of ``"row"``. ``row_targets``
    maps each targeted row to its target's ``id``; ``source_csv`` is the clean CSV the
    poisoned one was made from. ``data`` is the JSON object the fields were parsed from, for
    a writer that copies the manifest with a few entries changed (the scan benchmark's
    filtered copy): a view of the same parse, not a second reader.
    """

    path: Path
    rows: dict[int, str]
    targets: list[Target]
    backdoor: Backdoor | None
    poisoned_csv: Path | None
    keys: dict[str, str] = field(default_factory=dict)
    source_csv: Path | None = None
    row_targets: dict[int, int] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict, repr=False)


def read_manifest(path: Path | str, classes: ClassInfo | None = None) -> Manifest:
    """Read a ``roclip-poison/1`` manifest, the one reader of it.

    With ``classes`` its class labels and names are checked against that classes.json (a
    manifest of another dataset is refused); without, as a scan of a bare CSV has no
    classes.json, they are read as the integers they are.
    """
    path = Path(path)
    data = _read_json(path, MANIFEST_WHAT)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(
            f"manifest {path} (--manifest) has format {found!r}, expected {MANIFEST_FORMAT!r}; "
            "pass the manifest JSON that the kit's poisoning step wrote"
        )
    try:
        entries = data.get("rows") or []
        rows = {int(r["row"]): str(r["attack"]) for r in entries if "key" not in r}
        keys = {str(r["key"]): str(r["attack"]) for r in entries if "key" in r}
        row_targets = {
            int(r["row"]): int(r["target"])
            for r in entries
            if "key" not in r and r.get("target") is not None
        }
        targets = _read_targets(data.get("targeted"), classes, path)
        backdoor = _read_backdoor(data.get("backdoor"), classes, path)
    except (KeyError, TypeError) as err:
        raise ValueError(f"manifest {path} (--manifest) is missing an entry: {err!r}") from err
    return Manifest(
        path,
        rows,
        targets,
        backdoor,
        _optional_path(data.get("poisoned_csv")),
        keys,
        _optional_path(data.get("source_csv")),
        row_targets,
        data,
    )


def _optional_path(value: Any) -> Path | None:
    return Path(value) if value else None


def _label(classes: ClassInfo | None, label: Any, where: str) -> int:
    """A manifest's class index, checked against ``classes.json`` when it is at hand."""
    if classes is not None:
        return classes.label_of(str(label), where)
    try:
        return int(label)
    except ValueError:
        raise ValueError(f"{where}: class {label!r} is not a class index") from None


def _class_label(classes: ClassInfo | None, label: Any, name: Any, where: str) -> int:
    """A manifest's class, checked by index and name against ``classes.json``."""
    index = _label(classes, label, where)
    if classes is not None and name is not None and classes.names[index] != name:
        raise ValueError(
            f"{where}: class {label} is {classes.names[index]!r} in {classes.path} but "
            f"{name!r} in the manifest; evaluate with the dataset the manifest was made from"
        )
    return index


def _read_targets(section: Any, classes: ClassInfo | None, path: Path) -> list[Target]:
    if not section:
        return []
    targets = []
    for t in section["targets"]:
        where = f"manifest {path}, target {t['id']}"
        label = _label(classes, t["label"], where)
        adversarial = _class_label(
            classes, t["adversarial_label"], t.get("adversarial_class"), where
        )
        captions = t.get("captions")
        targets.append(
            Target(
                int(t["id"]),
                str(t["filepath"]),
                label,
                adversarial,
                None if captions is None else int(captions),
            )
        )
    return targets


def _read_backdoor(section: Any, classes: ClassInfo | None, path: Path) -> Backdoor | None:
    if not section:
        return None
    where = f"manifest {path}, backdoor"
    label = _class_label(classes, section["target_label"], section.get("target_class"), where)
    trigger = section["trigger"]
    if not isinstance(trigger, dict):
        raise ValueError(f"{where}: 'trigger' must be the trigger's parameters (a JSON object)")
    return Backdoor(label, trigger)


# ---------------------------------------------------------------- deprecated names
# Kept so code written against the twin readers keeps working; each warns and forwards to the
# one reader of its file.


def load_classes(path: Path) -> list[str]:
    """Deprecated: ``read_classes(path, need_templates=False).names``."""
    _deprecated("load_classes", "read_classes(path, need_templates=False).names")
    return read_classes(path, need_templates=False).names


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Deprecated: ``read_manifest(path).data`` (or the typed fields of ``read_manifest``)."""
    _deprecated("load_manifest", "read_manifest(path)")
    return read_manifest(path).data


def existing_image(value: str, csv_path: Path) -> Path:
    """Deprecated: ``resolve_image(value, csv_path, must_exist=True, absolute=True)``."""
    _deprecated("existing_image", "resolve_image(..., must_exist=True, absolute=True)")
    return Path(resolve_image(value, csv_path, must_exist=True, absolute=True))


def absolute_image(value: str, csv_path: Path) -> str:
    """Deprecated: ``resolve_image(value, csv_path, absolute=True)``."""
    _deprecated("absolute_image", "resolve_image(..., absolute=True)")
    return resolve_image(value, csv_path, absolute=True)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"roclip_kit.files.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3
    )
