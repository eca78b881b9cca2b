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

The readers of these files live here too, one place for each: ``classes.json``
(:func:`read_classes` with the zero-shot templates, :func:`load_classes` for the class names
alone), the CSVs and the image paths in them (:func:`read_split`, :func:`read_rows`,
:func:`read_captions`; :func:`resolve_image` keeps a missing image to be reported,
:func:`existing_image` refuses it, :func:`absolute_image` leaves it to the decoder) and the
manifest (:func:`read_manifest` checked against the classes, :func:`load_manifest` as plain
JSON).
"""

from __future__ import annotations

import csv
import json
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


@dataclass(frozen=True)
class ClassInfo:
    """Class names by label and the zero-shot prompt templates (each with one ``{}``)."""

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


def read_classes(path: Path | str, templates: Sequence[str] | None = None) -> ClassInfo:
    """Read ``classes.json``; ``templates`` replaces its templates when given."""
    path = Path(path)
    data = _read_json(path, "classes file (--classes or --dataset DIR/classes.json)")
    names = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f'{path} has no "classes" list of class names (the class name of each label, '
            "in label order)"
        )
    chosen = list(templates) if templates else data.get("templates")
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
    return ClassInfo(list(names), list(chosen), path)


def _read_json(path: Path, what: str) -> Any:
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err


def load_classes(path: Path) -> list[str]:
    """Class names by label from a classes.json (its ``classes`` list).

    Every refusal names the flags the file came from (``--classes``, or ``--dataset``'s
    folder), so a user who passed a wrong file sees which flag to change.
    """
    where = f"--classes or --dataset DIR/{CLASSES_FILE}"
    require_file(path, f"classes file ({where})")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as err:
        raise ValueError(f"classes file {path} (--classes) is not valid JSON: {err}") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(
            f'classes file {path} ({where}) needs a "classes" key holding the class names by '
            'label, e.g. {"classes": ["cat", "dog"]}'
        )
    check_unique_names(classes, path)
    return classes


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


def read_split(path: Path | str, classes: ClassInfo, what: str = "CSV file") -> Split:
    """Read a tab-separated CSV with ``filepath`` and ``label`` columns (OpenCLIP's format).

    ``what`` names the file and its flag in messages (``test CSV (--test-csv ...)``).
    """
    path = require_file(path, what)
    # utf-8-sig: a byte-order mark is not part of the first column's name
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=CSV_SEPARATOR)
        columns = reader.fieldnames or []
        require_columns(path, columns, (IMAGE_KEY, LABEL_KEY))
        filepaths, labels = [], []
        for row, record in enumerate(reader):
            filepaths.append(resolve_image(record[IMAGE_KEY] or "", path))
            labels.append(classes.label_of(record[LABEL_KEY] or "", f"{path} row {row}"))
    if not filepaths:
        raise ValueError(f"CSV file {path} has a header but no rows")
    n = len(filepaths)
    return Split(path, filepaths, np.asarray(labels, np.int64), np.arange(n, dtype=np.int64))


def resolve_image(value: str, csv_path: Path) -> str:
    """An image path of a CSV: absolute, or relative to the working directory or to the CSV.

    OpenCLIP reads relative paths from the working directory; the CSV's folder is tried too so
    a dataset directory can be moved. A missing file is kept as written, to be reported.
    """
    path = Path(value).expanduser()
    if path.is_absolute() or path.is_file():
        return str(path)
    beside = csv_path.parent / path
    return str(beside) if beside.is_file() else value


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
                f"{path} has no {column!r} column{hint}; its columns are {', '.join(columns)}"
            )


def read_captions(path: Path) -> list[str]:
    """The caption column of a training CSV, by data row."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=CSV_SEPARATOR)
        require_columns(path, reader.fieldnames or [], (CAPTION_KEY,))
        return [record[CAPTION_KEY] for record in reader]


def existing_image(value: str, csv_path: Path) -> Path:
    """An image path from a CSV: absolute, or relative to the working directory or the CSV.

    Unlike :func:`resolve_image` the file must exist (the poisoner copies it), and the path
    comes back resolved.
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path, csv_path.parent / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"{csv_path}: image {value!r} not found (looked at {candidates[0]})")


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a kit CSV (tab-separated, ``filepath``, ``title``, ``label``)."""
    if not path.is_file():
        raise ValueError(f"CSV file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=CSV_SEPARATOR)
        missing = [
            k for k in (IMAGE_KEY, CAPTION_KEY, LABEL_KEY) if k not in (reader.fieldnames or [])
        ]
        if missing:
            raise ValueError(
                f"{path} lacks column(s) {missing}; expected a tab-separated CSV with "
                f"{IMAGE_KEY}, {CAPTION_KEY} and {LABEL_KEY} (see roclip_kit.files)"
            )
        return list(reader)


def absolute_image(value: str, csv_path: Path) -> str:
    """An image path of a CSV, absolute and resolved, without checking that the file exists.

    As written when absolute or a file from the working directory, else relative to the CSV;
    decoding reports a missing file.
    """
    path = Path(value).expanduser()
    if path.is_absolute() or path.is_file():
        return str(path.resolve())
    return str((csv_path.parent / path).resolve())


# ---------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Backdoor:
    """The backdoor section of a manifest: target class and the trigger's parameters."""

    target_label: int
    trigger: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    """What was poisoned: poisoned CSV rows (row -> attack), targets and the backdoor.

    ``keys`` (``__key__`` -> attack) names poisoned samples of WebDataset shards, which have
    no row index: a manifest entry gives ``"key"`` in place of ``"row"``.
    """

    path: Path
    rows: dict[int, str]
    targets: list[Target]
    backdoor: Backdoor | None
    poisoned_csv: Path | None
    keys: dict[str, str] = field(default_factory=dict)


def read_manifest(path: Path | str, classes: ClassInfo) -> Manifest:
    """Read a ``roclip-poison/1`` manifest and check its classes against ``classes``."""
    path = Path(path)
    data = _read_json(path, "manifest (--manifest)")
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
        targets = _read_targets(data.get("targeted"), classes, path)
        backdoor = _read_backdoor(data.get("backdoor"), classes, path)
    except (KeyError, TypeError) as err:
        raise ValueError(f"manifest {path} is missing an entry: {err!r}") from err
    poisoned = data.get("poisoned_csv")
    return Manifest(path, rows, targets, backdoor, Path(poisoned) if poisoned else None, keys)


def _class_label(classes: ClassInfo, label: Any, name: Any, where: str) -> int:
    """A manifest's class, checked by index and name against ``classes.json``."""
    index = classes.label_of(str(label), where)
    if name is not None and classes.names[index] != name:
        raise ValueError(
            f"{where}: class {label} is {classes.names[index]!r} in {classes.path} but "
            f"{name!r} in the manifest; evaluate with the dataset the manifest was made from"
        )
    return index


def _read_targets(section: Any, classes: ClassInfo, path: Path) -> list[Target]:
    if not section:
        return []
    targets = []
    for t in section["targets"]:
        where = f"manifest {path}, target {t['id']}"
        label = classes.label_of(str(t["label"]), where)
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


def _read_backdoor(section: Any, classes: ClassInfo, path: Path) -> Backdoor | None:
    if not section:
        return None
    where = f"manifest {path}, backdoor"
    label = _class_label(classes, section["target_label"], section.get("target_class"), where)
    trigger = section["trigger"]
    if not isinstance(trigger, dict):
        raise ValueError(f"{where}: 'trigger' must be the trigger's parameters (a JSON object)")
    return Backdoor(label, trigger)


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read a poison manifest, checking its format tag."""
    path = require_file(path, "manifest")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as err:
        raise ValueError(f"manifest {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a poison manifest (format {MANIFEST_FORMAT!r})")
    return data
