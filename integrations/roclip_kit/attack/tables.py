"""Reading the CSV to poison: its columns, separator and labels, with refusals naming the flag.

The poisoner takes any CSV with an image, a caption and a label column (OpenCLIP's
``--csv-*`` settings as :class:`Columns`); :func:`read_table` reads it whole as a
:class:`Table`, labels parsed as class indices or class names of ``classes.json``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roclip_kit.files import CAPTION_KEY, CSV_SEPARATOR, IMAGE_KEY, LABEL_KEY
from roclip_plugin.io import require_file

_KEY_FLAGS = {"image": "--img-key", "caption": "--caption-key", "label": "--label-key"}


@dataclass(frozen=True)
class Columns:
    """Names of the CSV columns and the separator (OpenCLIP's ``--csv-*`` settings)."""

    image: str = IMAGE_KEY
    caption: str = CAPTION_KEY
    label: str = LABEL_KEY
    separator: str = CSV_SEPARATOR

    def __post_init__(self) -> None:
        """Refuse a separator the csv module cannot use, naming the flag."""
        sep = self.separator
        if not isinstance(sep, str) or len(sep) != 1 or sep in ('"', "\n", "\r"):
            raise ValueError(
                f"--separator {sep!r}: give one character other than a quote or a line break "
                "(the kit's CSVs use a tab: --separator '\\t')"
            )
        for role in ("image", "caption", "label"):
            if not isinstance(getattr(self, role), str) or not getattr(self, role):
                raise ValueError(f"{_KEY_FLAGS[role]}: an empty column name; give the column")
        names = [self.image, self.caption, self.label]
        if len(set(names)) != 3:
            raise ValueError(
                f"--img-key, --caption-key and --label-key name one column twice ({names}); "
                "give three different columns"
            )


@dataclass
class Table:
    """A CSV read as text, with each row's class index parsed from the label column."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    labels: np.ndarray
    numeric_labels: bool
    columns: Columns

    def index(self, key: str) -> int:
        """Position of a column (checked to exist when the table was read)."""
        return self.header.index(key)

    def cell(self, row: int, key: str) -> str:
        """The text of one cell."""
        return self.rows[row][self.index(key)]


def _parse_label(value: str, classes: list[str], where: str) -> int:
    """A label cell as a class index: an integer index or a class name (any case)."""
    text = value.strip()
    if text.lstrip("-").isdigit():
        label = int(text)
        if 0 <= label < len(classes):
            return label
        raise ValueError(f"{where}: label {label} is outside 0..{len(classes) - 1} (classes.json)")
    lowered = [c.lower() for c in classes]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise ValueError(
        f"{where}: label {value!r} is no class index or class name ({_valid(classes)})"
    )


def _valid(classes: list[str]) -> str:
    return "valid classes: " + ", ".join(classes)


def read_table(path: Path, columns: Columns, classes: list[str], flag: str) -> Table:
    """Read a CSV, checking that the image, caption and label columns exist.

    Args:
        path: the CSV file.
        columns: column names and separator.
        classes: class names by label, to parse the label column.
        flag: the option that named the file, for error messages.
    """
    require_file(path, flag)
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=columns.separator)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{flag} {path}: the file is empty (a header row is needed)")
        _check_header(path, header, columns)
        rows = [row for row in reader if row]
    width = len(header)
    labels = np.empty(len(rows), dtype=np.int64)
    label_col = header.index(columns.label)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"{path}, data row {i}: {len(row)} fields where the header has {width}; "
                f"is the separator right (--separator, now {columns.separator!r})?"
            )
        labels[i] = _parse_label(row[label_col], classes, f"{path}, data row {i}")
    numeric = all(r[label_col].strip().lstrip("-").isdigit() for r in rows)
    return Table(path, header, rows, labels, numeric, columns)


def _check_header(path: Path, header: list[str], columns: Columns) -> None:
    for role, flag in _KEY_FLAGS.items():
        name = getattr(columns, role)
        if name not in header:
            raise ValueError(
                f"{path} has no column {name!r} (columns: {', '.join(header)}): set {flag} to "
                f"the column that holds the {role}"
                + (
                    f" (is the separator {columns.separator!r} right? --separator)"
                    if len(header) == 1
                    else ""
                )
            )
