"""The evaluation's metrics as pure functions over features, labels and ranked rows.

Zero-shot predictions and hit rates, the linear probe, and poison detection scored from the
``suspicious_epoch_N.csv`` files a RoCLIP run writes; each can be checked on hand-made numbers.
Exact definitions are in docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from roclip_plugin.io import require_file
from roclip_plugin.stats import SUSPICIOUS_GLOB, read_suspicious_rows, suspicious_epoch


def select_rows(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset of ``limit`` of ``n`` items (all if None).

    Random rather than the first ``limit``: CSVs are often sorted by class.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"a limit must be at least 1 (got {limit}); omit it to use every row")
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def average_templates(template_features: torch.Tensor) -> torch.Tensor:
    """Class embeddings from ``[classes, templates, dim]`` text features.

    Each template embedding is normalised, averaged per class and the mean normalised again,
    so cosine similarity (a dot product) compares images with every class on equal footing.
    """
    return F.normalize(F.normalize(template_features, dim=-1).mean(dim=1), dim=-1)


def zero_shot_predict(image_features: torch.Tensor, class_features: torch.Tensor) -> np.ndarray:
    """Top-1 class of each image: the class embedding of highest cosine similarity."""
    if image_features.shape[-1] != class_features.shape[-1]:
        raise ValueError(
            f"image features have {image_features.shape[-1]} dimensions, class embeddings "
            f"{class_features.shape[-1]}: they come from different models"
        )
    sims = F.normalize(image_features, dim=-1) @ F.normalize(class_features, dim=-1).T
    return sims.argmax(dim=-1).cpu().numpy()


def hit_rate(predictions: np.ndarray, wanted: np.ndarray | int) -> float:
    """Share of predictions equal to ``wanted`` (accuracy, or attack success)."""
    predictions = np.asarray(predictions)
    if predictions.size == 0:
        raise ValueError("no predictions to score (an empty set of images)")
    return float(np.mean(predictions == np.asarray(wanted)))


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a logistic regression fit on frozen, normalised image features.

    Features are L2-normalised, then standardised with the training rows' mean and spread: an
    early or collapsed model's unit features differ from each other by tiny amounts that the
    regulariser would otherwise flatten to chance, and the probe measures what is linearly
    decodable, not the features' scale. L-BFGS on a convex loss from a zero start is
    deterministic, so no seed is needed.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_labels)) < 2:
        raise ValueError(
            "the linear probe needs training rows of at least two classes; raise "
            "--probe-limit or check the label column of the training CSV"
        )
    scaler = StandardScaler().fit(_unit_rows(train_features))
    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit(scaler.transform(_unit_rows(train_features)), train_labels)
    return hit_rate(model.predict(scaler.transform(_unit_rows(test_features))), test_labels)


def _unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class DetectionScores:
    """How well a ranking of rows (most suspicious first) finds the poisoned ones."""

    k: int
    hits: int
    poisoned: int
    listed: int
    precision: float
    recall: float
    average_precision: float


def detection_scores(
    ranked: Sequence[Hashable], poisoned: Collection[Hashable], k: int | None = None
) -> DetectionScores:
    """Precision and recall of the top ``k`` ranked rows, and average precision.

    ``ranked`` lists row indices (or WebDataset keys), most suspicious first, each once
    (``-1`` or ``""``: a row of unknown index, never a hit). ``k`` defaults to the number of
    poisoned rows and is capped at the rows listed (an empty list finds nothing: every figure
    is 0, as a defense that flagged no row found no poison). Average precision is the mean over
    poisoned rows of the precision at the rank where each is found, a poisoned row missing
    from the list counting 0: the files keep only the top rows, so this is a lower bound of
    the AP over the full ranking.
    """
    poisoned = set(poisoned)
    if not poisoned:
        raise ValueError("the manifest lists no poisoned rows: there is nothing to detect")
    if not ranked:  # nothing flagged (e.g. no step judged a pair risky): nothing found
        return DetectionScores(0, 0, len(poisoned), 0, 0.0, 0.0, 0.0)
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    k = min(len(poisoned) if k is None else k, len(ranked))
    is_hit = np.fromiter((row in poisoned for row in ranked), dtype=bool, count=len(ranked))
    cumulative = np.cumsum(is_hit)
    ranks = np.arange(1, len(ranked) + 1)
    ap = float(np.sum((cumulative / ranks)[is_hit]) / len(poisoned))
    hits = int(cumulative[k - 1])
    return DetectionScores(k, hits, len(poisoned), len(ranked), hits / k, hits / len(poisoned), ap)


@dataclass(frozen=True)
class SuspiciousRanking:
    """Rows of a ``suspicious_epoch_N.csv`` by decreasing margin, with their captions.

    ``keys`` are the WebDataset ``__key__`` of each row ("" for CSV rows, which have an index).
    """

    path: Path
    epoch: int | None
    rows: list[int]
    captions: list[str]
    keys: list[str] = field(default_factory=list)


def read_suspicious(path: Path | str) -> SuspiciousRanking:
    """Read a suspicious file (``index,[key,]caption,margin``) into a ranking.

    Rows are sorted by margin (highest first), ties by index and key, so the order of lines in
    the file does not matter; a repeated row (index, or key where the index is -1) keeps its
    highest margin (a distributed sampler can pad an epoch with repeats). A row with neither
    (index ``-1``, no key) stays, as a row that is never a hit.
    """
    path = require_file(path, "suspicious file")
    entries = sorted(read_suspicious_rows(path), key=lambda e: (-e.margin, e.index, e.key))
    seen: set[int | str] = set()
    rows, captions, keys = [], [], []
    for entry in entries:
        index, key = entry.index, entry.key
        name: int | str | None = index if index >= 0 else (key or None)
        if name is not None and name in seen:
            continue
        seen.add(index if name is None else name)
        rows.append(index)
        captions.append(entry.caption)
        keys.append(key)
    if rows and all(r < 0 for r in rows) and not any(keys):
        raise ValueError(
            f"suspicious file {path} has no dataset row indices (all -1) and no keys: the run's "
            "training data were neither a CSV dataset nor WebDataset shards with keys, so rows "
            "cannot be matched to the manifest"
        )
    return SuspiciousRanking(path, suspicious_epoch(path), rows, captions, keys)


def find_suspicious(folder: Path | str, epoch: str | int = "latest") -> list[Path]:
    """``suspicious_epoch_N.csv`` files in ``folder`` or its ``checkpoints/`` sub-folder.

    ``epoch``: ``"latest"`` (highest N), ``"all"`` (every N, ascending) or a number.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"run folder {folder} does not exist (--run-dir)")
    found: dict[int, Path] = {}
    for place in (folder, folder / "checkpoints"):
        for path in sorted(place.glob(SUSPICIOUS_GLOB)):
            number = suspicious_epoch(path)
            if number is not None:
                found.setdefault(number, path)
    if epoch == "all":
        return [found[n] for n in sorted(found)]
    if epoch == "latest":
        return [found[max(found)]] if found else []
    number = int(epoch)
    if number not in found:
        have = ", ".join(map(str, sorted(found))) or "none"
        raise ValueError(
            f"--suspicious-epoch {number}: no suspicious_epoch_{number}.csv in {folder} (epochs "
            f"with a file: {have}); files are written for matching epochs only"
        )
    return [found[number]]
