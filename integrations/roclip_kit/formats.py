"""The files the kit reads and writes, in one place, so every step agrees on them.

A **captioned dataset directory** (written by :mod:`roclip_kit.datasets`)::

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
``apply(PIL.Image) -> PIL.Image`` and ``to_dict()``; ``roclip_kit.triggers.trigger_from_dict``
rebuilds the identical trigger at test time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

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
