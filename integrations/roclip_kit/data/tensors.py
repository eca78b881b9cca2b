"""A captioned dataset held in memory as tensors, and a compact word tokenizer for it.

The tensor-resident training path (:mod:`roclip_kit.train.tensor`) reads the same files as
every other step of the kit (a captioned dataset directory, or the poisoned copy that
:mod:`roclip_kit.attack.poison` wrote, with its manifest) and decodes every image once into a
``uint8 [N, 3, H, W]`` tensor, so an epoch costs the model's arithmetic and nothing else: no
PNG decoding, no per-sample transform, no tokenising of unchanged captions.

Captions are tokenised by :class:`WordTokenizer`, a vocabulary of the words the dataset's
captions and zero-shot prompts use (a few hundred for captioned MNIST) instead of OpenCLIP's
49,408 BPE tokens, whose embedding would otherwise hold most of a small model's parameters.
It has OpenCLIP's tokenizer call, ``tokenizer(texts, context_length=None) -> LongTensor``, and
puts the end-of-text token last in the id range, so OpenCLIP's ``argmax`` text pooling finds
it. Words it has never seen (a synonym that EDA inserts, say) map to one unknown-word token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roclip_kit.files import (
    CAPTION_KEY,
    CLASSES_FILE,
    IMAGE_KEY,
    LABEL_KEY,
    ClassInfo,
    Manifest,
    read_classes,
    read_manifest,
    read_rows,
    resolve_image,
)

WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
PAD, UNK, SOT = 0, 1, 2
FIRST_WORD = 3
TOKENIZER_FORMAT = "roclip_kit.word_tokenizer/1"


def words_of(text: str) -> list[str]:
    """The words of a caption, lower-cased, punctuation dropped ("t-shirt" stays one word)."""
    return WORD.findall(text.lower())


class WordTokenizer:
    """Captions to token ids over a fixed word list: ``[SOT, w1, ..., wn, EOT, PAD, ...]``.

    Ids: 0 padding, 1 unknown word, 2 start of text, 3.. the words in list order, and the
    end-of-text token last (``vocab_size - 1``), as OpenCLIP's ``argmax`` pooling expects. A
    caption longer than the context keeps its first ``context_length - 2`` words.

    Args:
        words: the vocabulary, each word once.
        context_length: tokens per caption, start and end included.
    """

    def __init__(self, words: Sequence[str], context_length: int) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        self.words = list(words)
        if len(set(self.words)) != len(self.words):
            raise ValueError("WordTokenizer: a word is listed twice")
        self.context_length = context_length
        self._ids = {w: FIRST_WORD + i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str], context_length: int) -> WordTokenizer:
        """A tokenizer over every word of ``texts``, sorted (the same texts give the same ids)."""
        vocabulary = sorted({w for text in texts for w in words_of(text)})
        return cls(vocabulary, context_length)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, the model's ``text_cfg.vocab_size``."""
        return FIRST_WORD + len(self.words) + 1

    @property
    def eot(self) -> int:
        """The end-of-text id: the highest one."""
        return self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, without padding."""
        ids = [self._ids.get(w, UNK) for w in words_of(text)][: self.context_length - 2]
        return [SOT, *ids, self.eot]

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """``LongTensor [N, context_length]`` of ``texts`` (OpenCLIP's tokenizer call)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        length = self.context_length if context_length is None else context_length
        out = torch.full((len(batch), length), PAD, dtype=torch.long)
        for row, text in enumerate(batch):
            ids = self.encode(text)
            if len(ids) > length:
                ids = [*ids[: length - 1], self.eot]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def unknown_share(self, texts: Sequence[str]) -> float:
        """Share of the words of ``texts`` outside the vocabulary (for logs)."""
        found = [w in self._ids for text in texts for w in words_of(text)]
        return 0.0 if not found else 1.0 - sum(found) / len(found)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, saved with the model so evaluation tokenises the same way."""
        return {
            "format": TOKENIZER_FORMAT,
            "words": self.words,
            "context_length": self.context_length,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WordTokenizer:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != TOKENIZER_FORMAT:
            raise ValueError(
                f"not a saved WordTokenizer (format {data.get('format')!r}, expected "
                f"{TOKENIZER_FORMAT!r})"
            )
        return cls(list(data["words"]), int(data["context_length"]))


# ---------------------------------------------------------------- images and splits


def decode_images(paths: Sequence[str], size: int | None = None) -> torch.Tensor:
    """``uint8 [N, 3, H, W]`` of image files, RGB, all of one size (``size`` resizes them).

    Decoding 60,000 32 px PNGs takes about 3 s on one core; no cache is kept.
    """
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(rgb, dtype=np.uint8))
    if not arrays:
        return torch.empty(0, 3, size or 0, size or 0, dtype=torch.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"images of different sizes {sorted(shapes)[:3]}: give an image size to resize them"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class TensorSplit:
    """One CSV's rows in memory.

    Attributes:
        images: ``uint8 [N, 3, H, W]``.
        captions: the caption of each row.
        labels: the CSV's label of each row: the class its caption names.
        filepaths: the image files (absolute), for evaluation by file.
        csv: the CSV the rows come from.
    """

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    filepaths: list[str]
    csv: Path

    def __len__(self) -> int:
        return len(self.captions)


def load_split(path: Path, classes: ClassInfo, image_size: int | None = None) -> TensorSplit:
    """Decode every row of a CSV into a :class:`TensorSplit`."""
    rows = read_rows(path, require_rows=True)
    labels = [classes.label_of(r[LABEL_KEY], f"{path} row {i}") for i, r in enumerate(rows)]
    files = [resolve_image(r[IMAGE_KEY], path, absolute=True) for r in rows]
    return TensorSplit(
        images=decode_images(files, image_size),
        captions=[r[CAPTION_KEY] for r in rows],
        labels=torch.tensor(labels, dtype=torch.long),
        filepaths=files,
        csv=path,
    )


# ---------------------------------------------------------------- a poisoned dataset


@dataclass
class PoisonedData:
    """A (poisoned) captioned dataset in memory, with what the manifest says of each row.

    Attributes:
        root: the dataset directory.
        classes: class names by label.
        templates: zero-shot prompt templates.
        train: the training rows (poisoned CSV).
        test: the held-out rows.
        image_labels: per training row, the class of its *image* (a poisoned row's caption
            names another class: its label column holds the caption's class).
        poison_kind: per training row, 0 clean, 1 targeted, 2 backdoor.
        manifest: the manifest's path, or None for clean data.
    """

    root: Path
    classes: list[str]
    templates: list[str]
    train: TensorSplit
    test: TensorSplit
    image_labels: torch.Tensor
    poison_kind: torch.Tensor
    manifest: Path | None

    @property
    def poisoned_rows(self) -> list[int]:
        """Training rows the manifest lists as poisoned."""
        return torch.nonzero(self.poison_kind > 0).flatten().tolist()

    def without_poison(self) -> PoisonedData:
        """The same data with the poisoned training rows removed (the benchmark's floor).

        The test split, the manifest (targets and trigger, for attack success) stay: a model
        trained on this shows what the attacks score with no poison learned.
        """
        keep = torch.nonzero(self.poison_kind == CLEAN).flatten()
        rows = keep.tolist()
        train = TensorSplit(
            images=self.train.images[keep],
            captions=[self.train.captions[i] for i in rows],
            labels=self.train.labels[keep],
            filepaths=[self.train.filepaths[i] for i in rows],
            csv=self.train.csv,
        )
        return replace(
            self,
            train=train,
            image_labels=self.image_labels[keep],
            poison_kind=self.poison_kind[keep],
        )


CLEAN, TARGETED, BACKDOOR = 0, 1, 2
_KINDS = {"targeted": TARGETED, "backdoor": BACKDOOR}


def load_poisoned(
    root: str | Path, manifest: str | Path | None = None, image_size: int | None = None
) -> PoisonedData:
    """Load a dataset directory (``train.csv``, ``test.csv``, ``classes.json``) into memory.

    Args:
        root: the directory (a poisoned one holds ``manifest.json`` too).
        manifest: the poison manifest; default: ``root/manifest.json`` when it exists.
        image_size: resize images to this side (default: keep their size).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"dataset directory {root} does not exist (--dataset)")
    info = read_classes(root / CLASSES_FILE, need_templates=False)
    classes, templates = info.names, info.templates or ["{}"]
    train = load_split(root / "train.csv", info, image_size)
    test = load_split(root / "test.csv", info, image_size)
    default = root / "manifest.json"
    path = Path(manifest) if manifest is not None else (default if default.is_file() else None)
    kinds = torch.zeros(len(train), dtype=torch.long)
    image_labels = train.labels.clone()
    if path is not None:
        _apply_manifest(read_manifest(path, info), info, kinds, image_labels)
    return PoisonedData(root, classes, templates, train, test, image_labels, kinds, path)


def _apply_manifest(
    manifest: Manifest,
    classes: ClassInfo,
    kinds: torch.Tensor,
    image_labels: torch.Tensor,
) -> None:
    """Mark poisoned rows and recover their images' true classes.

    A target's class is in the manifest; a backdoored row's is the source CSV's label of the
    same row (backdoors change rows in place). Without the source CSV a backdoored row keeps
    the label of its caption's class.
    """
    targets = {t.id: t.label for t in manifest.targets}
    source = manifest.source_csv
    source_labels = None
    if source is not None and source.is_file():
        rows = read_rows(source)
        source_labels = [
            classes.label_of(r[LABEL_KEY], f"{source} row {i}") for i, r in enumerate(rows)
        ]
    for row, attack in manifest.rows.items():
        kind = _KINDS[attack]
        kinds[row] = kind
        if kind == TARGETED:
            image_labels[row] = targets[manifest.row_targets[row]]
        elif source_labels is not None:
            image_labels[row] = source_labels[row]
