"""Measure a CLIP checkpoint: clean accuracy, attack success and poison detection.

The metrics are pure functions over L2-normalised features, labels and ranked rows
(:mod:`roclip_kit.evaluate.metrics`), so each can be checked on hand-made numbers; thin
wrappers (:mod:`roclip_kit.evaluate.features`) encode images and texts with a loaded model
(:mod:`roclip_kit.train.models`) and feed them in. :func:`evaluate_checkpoint` runs what the inputs
allow and returns a JSON-able dict. Exact definitions are in docs/evaluation.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from roclip_kit.evaluate.features import (
    ProgressFactory,
    check_images,
    class_embeddings,
    encode_images,
)
from roclip_kit.evaluate.metrics import (
    SuspiciousRanking,
    detection_scores,
    hit_rate,
    linear_probe_accuracy,
    read_suspicious,
    select_rows,
    zero_shot_predict,
)
from roclip_kit.files import (
    CLASSES_FILE,
    TEST_CSV,
    TRAIN_CSV,
    Backdoor,
    ClassInfo,
    Manifest,
    Split,
    Target,
    Trigger,
    read_captions,
    read_classes,
    read_manifest,
    read_split,
)
from roclip_kit.train.loaded import LoadedModel
from roclip_kit.train.models import load_openclip
from roclip_plugin.io import require_file

DETECTION_MISMATCH_LIMIT = 0.1  # share of captions that may differ from the poisoned CSV


# ---------------------------------------------------------------- evaluation steps


@dataclass(frozen=True)
class EvalData:
    """The files an evaluation reads; only ``test_csv`` and ``classes`` are required."""

    test_csv: Path
    classes: Path
    train_csv: Path | None = None
    manifest: Path | None = None
    suspicious: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        """Accept ``str`` paths too (from Python callers)."""
        for name in ("test_csv", "classes", "train_csv", "manifest"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "suspicious", tuple(Path(p) for p in self.suspicious))

    @classmethod
    def from_dataset_dir(cls, folder: Path | str, **overrides: Any) -> EvalData:
        """The files of a captioned dataset directory (see :mod:`roclip_kit.files`)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"dataset directory {folder} does not exist (--dataset)")
        train = folder / TRAIN_CSV
        data = cls(folder / TEST_CSV, folder / CLASSES_FILE, train if train.is_file() else None)
        return replace(data, **overrides)


@dataclass(frozen=True)
class EvalSettings:
    """What to run and how much of it; the defaults suit a full evaluation."""

    templates: tuple[str, ...] | None = None
    linear_probe: bool | None = None  # None: run it when a training CSV is known
    test_limit: int | None = None
    backdoor_limit: int | None = None
    probe_limit: int | None = 5000
    probe_c: float = 1.0
    detection_k: int | None = None
    batch_size: int = 64
    seed: int = 0


@dataclass
class _Context:
    """What the steps share: the model, the class embeddings, progress reporting."""

    loaded: LoadedModel
    classes: ClassInfo
    class_features: torch.Tensor
    settings: EvalSettings
    progress: ProgressFactory | None
    notes: list[str] = field(default_factory=list)

    def encode(
        self, description: str, split: Split, transform: Callable[[Any], Any] | None = None
    ) -> torch.Tensor:
        check_images(split.filepaths, lambda i: f"row {split.rows[i]} of {split.path}")
        advance = self.progress(description, len(split)) if self.progress else None
        return encode_images(
            self.loaded,
            split.filepaths,
            batch_size=self.settings.batch_size,
            transform=transform,
            progress=advance,
            where=lambda i: f"row {split.rows[i]} of {split.path}",
        )


def zero_shot(ctx: _Context, test: Split, predictions: np.ndarray) -> dict[str, Any]:
    """Zero-shot top-1 accuracy over ``test`` (given its predictions), overall and per class."""
    per_class = {
        name: hit_rate(predictions[test.labels == c], c)
        for c, name in enumerate(ctx.classes.names)
        if np.any(test.labels == c)
    }
    return {
        "accuracy": hit_rate(predictions, test.labels),
        "correct": int(np.sum(predictions == test.labels)),
        "images": len(test),
        "per_class": per_class,
    }


def targeted_attack(ctx: _Context, manifest: Manifest) -> dict[str, Any]:
    """Share of targets whose zero-shot top-1 class is their adversarial class."""
    targets = manifest.targets
    paths = [t.filepath for t in targets]
    check_images(paths, lambda i: f"target {targets[i].id} of manifest {manifest.path}")
    advance = ctx.progress("target images", len(paths)) if ctx.progress else None
    features = encode_images(
        ctx.loaded,
        paths,
        batch_size=ctx.settings.batch_size,
        progress=advance,
        where=lambda i: f"target {targets[i].id} of manifest {manifest.path}",
    )
    predictions = zero_shot_predict(features, ctx.class_features)
    wanted = np.asarray([t.adversarial_label for t in targets])
    names = ctx.classes.names
    return {
        "success_rate": hit_rate(predictions, wanted),
        "successes": int(np.sum(predictions == wanted)),
        "targets": len(targets),
        "by_captions": success_by_captions(targets, predictions == wanted),
        "per_target": [
            {
                "id": t.id,
                "label": names[t.label],
                "adversarial_class": names[t.adversarial_label],
                "predicted": names[int(p)],
                "success": bool(p == t.adversarial_label),
            }
            for t, p in zip(targets, predictions, strict=True)
        ],
    }


def success_by_captions(
    targets: Sequence[Target], successes: np.ndarray
) -> dict[str, dict[str, float | int]]:
    """Success per poisoning strength (captions per target), keyed by the count as text.

    Empty when the manifest does not record the counts.
    """
    groups: dict[int, list[bool]] = {}
    for target, success in zip(targets, successes, strict=True):
        if target.captions is not None:
            groups.setdefault(target.captions, []).append(bool(success))
    return {
        str(n): {"success_rate": float(np.mean(hits)), "successes": sum(hits), "targets": len(hits)}
        for n, hits in sorted(groups.items())
    }


def backdoor_attack(
    ctx: _Context,
    backdoor: Backdoor,
    test: Split,
    trigger: Trigger | None = None,
    clean: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Share of triggered test images not of the target class read as the target class.

    ``trigger`` defaults to the manifest's (rebuilt by ``trigger_from_dict``). ``clean`` holds
    the zero-shot predictions of the same test split, for the rate without the trigger.
    """
    trigger = trigger if trigger is not None else _rebuild_trigger(backdoor.trigger)
    others = np.flatnonzero(test.labels != backdoor.target_label)
    if others.size == 0:
        raise ValueError(f"{test.path} has no image outside the backdoor's target class")
    limit, seed = ctx.settings.backdoor_limit, ctx.settings.seed
    chosen = test.take(others[select_rows(len(others), limit, seed)])
    features = ctx.encode("triggered test images", chosen, trigger.apply)
    predictions = zero_shot_predict(features, ctx.class_features)
    result = {
        "success_rate": hit_rate(predictions, backdoor.target_label),
        "hits": int(np.sum(predictions == backdoor.target_label)),
        "images": len(chosen),
        "target_class": ctx.classes.names[backdoor.target_label],
        "trigger": getattr(trigger, "kind", type(trigger).__name__),
    }
    mask = clean["labels"] != backdoor.target_label if clean is not None else None
    if clean is not None and np.any(mask):
        result["clean_target_rate"] = hit_rate(clean["predictions"][mask], backdoor.target_label)
    return result


def _rebuild_trigger(parameters: dict[str, Any]) -> Trigger:
    from roclip_kit.attack.triggers import trigger_from_dict

    return trigger_from_dict(parameters)


def linear_probe(
    ctx: _Context,
    train: Split,
    test: Split,
    test_features: torch.Tensor,
) -> dict[str, Any]:
    """Logistic regression on frozen features of (a seeded subset of) the clean train rows."""
    chosen = train.take(select_rows(len(train), ctx.settings.probe_limit, ctx.settings.seed))
    train_features = ctx.encode("probe training images", chosen)
    accuracy = linear_probe_accuracy(
        train_features.numpy(),
        chosen.labels,
        test_features.numpy(),
        test.labels,
        c=ctx.settings.probe_c,
    )
    return {"accuracy": accuracy, "train_images": len(chosen), "test_images": len(test)}


def poison_detection(
    files: Sequence[Path], manifest: Manifest, k: int | None = None
) -> list[dict[str, Any]]:
    """Detection scores of each suspicious file against the manifest's poisoned rows.

    Rows are matched by CSV row index, or by WebDataset ``__key__`` when the manifest names
    its poisoned samples by key.
    """
    captions = _poisoned_captions(manifest)
    results = []
    for path in files:
        ranking = read_suspicious(path)
        ranked, poisoned = _ranked_and_poisoned(ranking, manifest)
        if captions is not None and not manifest.keys:
            _check_same_rows(ranking, captions, manifest)
        scores = detection_scores(ranked, poisoned, k)
        top = set(ranked[: scores.k])
        by_attack = {}
        for attack in sorted(set(poisoned.values())):
            rows = [r for r, a in poisoned.items() if a == attack]
            by_attack[attack] = sum(r in top for r in rows) / len(rows)
        results.append(
            {
                "file": str(path),
                "epoch": ranking.epoch,
                **vars(scores),
                "recall_by_attack": by_attack,
            }
        )
    return results


def _ranked_and_poisoned(
    ranking: SuspiciousRanking, manifest: Manifest
) -> tuple[list[Hashable], dict[Hashable, str]]:
    """The ranking's ids and the manifest's poisoned ids, both rows or both keys."""
    if not manifest.keys:
        return list(ranking.rows), dict(manifest.rows)
    if not any(ranking.keys):
        raise ValueError(
            f"manifest {manifest.path} names poisoned samples by key but {ranking.path} has no "
            "keys: pass the suspicious file of a run on the WebDataset shards the manifest lists"
        )
    return list(ranking.keys), dict(manifest.keys)


def _poisoned_captions(manifest: Manifest) -> list[str] | None:
    """Captions of the poisoned CSV, when it is at hand, to check the files refer to it."""
    if manifest.poisoned_csv is None or not manifest.poisoned_csv.is_file():
        return None
    return read_captions(manifest.poisoned_csv)


def _check_same_rows(ranking: SuspiciousRanking, captions: list[str], manifest: Manifest) -> None:
    """Refuse to score a file whose row numbers are rows of another CSV."""
    pairs = [(r, c) for r, c in zip(ranking.rows, ranking.captions, strict=True) if r >= 0 and c]
    if not pairs:
        return
    wrong = sum(r >= len(captions) or captions[r] != c for r, c in pairs)
    if wrong > DETECTION_MISMATCH_LIMIT * len(pairs):
        raise ValueError(
            f"{wrong} of {len(pairs)} captions in {ranking.path} differ from those rows of "
            f"{manifest.poisoned_csv}: the run was not trained on the poisoned CSV of "
            f"manifest {manifest.path}; pass the manifest of that run's training data"
        )


# ---------------------------------------------------------------- the whole evaluation


def evaluate_checkpoint(
    checkpoint: Path | str,
    model: str,
    data: EvalData,
    settings: EvalSettings = EvalSettings(),
    *,
    device: str = "cpu",
    force_quick_gelu: bool = False,
    progress: ProgressFactory | None = None,
    trigger: Trigger | None = None,
) -> dict[str, Any]:
    """Load an OpenCLIP checkpoint and run every evaluation ``data`` allows (JSON-able).

    Every input file is read and checked before the model is loaded, so a bad file fails in a
    second, not after seconds to minutes of building the model.
    """
    inputs = read_inputs(data, settings)
    loaded = load_openclip(checkpoint, model, device, force_quick_gelu=force_quick_gelu)
    return evaluate_model(loaded, data, settings, progress=progress, trigger=trigger, inputs=inputs)


@dataclass(frozen=True)
class EvalInputs:
    """The evaluation's input files, read and checked: classes, test rows, manifest, probe rows."""

    classes: ClassInfo
    test: Split
    manifest: Manifest | None
    train: Split | None


def read_inputs(
    data: EvalData, settings: EvalSettings, classes: ClassInfo | None = None
) -> EvalInputs:
    """Read every input file of an evaluation (no model needed)."""
    classes = classes or read_classes(data.classes, settings.templates)
    test = read_split(data.test_csv, classes, "test CSV (--test-csv or --dataset DIR/test.csv)")
    manifest = read_manifest(data.manifest, classes) if data.manifest else None
    train = _probe_training_rows(data, settings, classes, manifest)
    for path in data.suspicious:
        require_file(path, "suspicious file (--suspicious)")
    return EvalInputs(classes, test, manifest, train)


def evaluate_model(
    loaded: LoadedModel,
    data: EvalData,
    settings: EvalSettings = EvalSettings(),
    *,
    progress: ProgressFactory | None = None,
    trigger: Trigger | None = None,
    classes: ClassInfo | None = None,
    inputs: EvalInputs | None = None,
) -> dict[str, Any]:
    """Run every evaluation ``data`` allows with an already loaded model (JSON-able dict).

    Without a manifest only clean accuracy (zero-shot, linear probe) is measured. ``inputs``
    (from :func:`read_inputs`) skips reading the files again.
    """
    inputs = inputs or read_inputs(data, settings, classes)
    classes, manifest, train = inputs.classes, inputs.manifest, inputs.train
    test_all = without_targets(inputs.test, manifest)
    ctx = _Context(loaded, classes, class_embeddings(loaded, classes), settings, progress)
    left_out = len(inputs.test) - len(test_all)
    if left_out:
        ctx.notes.append(
            f"{left_out} target images of the targeted attack left out of clean accuracy, "
            "the linear probe and the backdoor's test images"
        )
    test = test_all.take(select_rows(len(test_all), settings.test_limit, settings.seed))
    features = ctx.encode("test images", test)
    predictions = zero_shot_predict(features, ctx.class_features)
    result = _header(loaded, data, classes)
    result["zero_shot"] = zero_shot(ctx, test, predictions) | {"targets_left_out": left_out}
    probe = train is not None and len(train) > 0
    result["linear_probe"] = linear_probe(ctx, train, test, features) if probe else None
    result.update(_attacks(ctx, manifest, test_all, test, predictions, trigger))
    result["detection"] = _detection(ctx, data, manifest)
    result["notes"] = ctx.notes + _skipped(data, settings, manifest, train)
    return result


def without_targets(test: Split, manifest: Manifest | None) -> Split:
    """``test`` without the targeted attack's target images (matched by their resolved path).

    Targets are drawn from the held-out rows, so the clean test split holds them too: scored
    as clean images they would count the attack's own images in clean accuracy (in favour of
    whichever model resists the attack best). A target that is not an image of ``test`` means
    the manifest was written for other data: refused, as its figures would be meaningless.
    """
    if manifest is None or not manifest.targets:
        return test
    targets = {os.path.realpath(t.filepath) for t in manifest.targets}
    resolved = [os.path.realpath(path) for path in test.filepaths]
    missing = sorted(targets - set(resolved))
    if missing:
        raise ValueError(
            f"manifest {manifest.path} (--manifest): {len(missing)} of its {len(targets)} target "
            f"images (e.g. {missing[0]}) are not images of the test CSV {test.path}, so it was "
            "written for other data; pass the manifest of the poisoned data whose held-out CSV "
            "this is (or --test-csv that held-out CSV)"
        )
    keep = [i for i, path in enumerate(resolved) if path not in targets]
    if not keep:
        raise ValueError(
            f"every image of {test.path} is a target of manifest {manifest.path}: pass the "
            "held-out CSV the targets were drawn from, which holds clean images too"
        )
    return test.take(np.asarray(keep, dtype=np.int64))


def _probe_training_rows(
    data: EvalData, settings: EvalSettings, classes: ClassInfo, manifest: Manifest | None
) -> Split | None:
    """Clean training rows for the linear probe, or None when it is not run."""
    if settings.linear_probe is False:
        return None
    if data.train_csv is None:
        if settings.linear_probe:
            raise ValueError(
                "--linear-probe needs a training CSV: pass --dataset DIR (with train.csv) "
                "or --train-csv"
            )
        return None
    train = read_split(data.train_csv, classes, "training CSV (--train-csv)")
    if manifest and manifest.poisoned_csv and _same_file(manifest.poisoned_csv, data.train_csv):
        keep = np.flatnonzero(~np.isin(train.rows, list(manifest.rows)))
        train = train.take(keep)
    return train


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.resolve() == b.resolve()


def _attacks(
    ctx: _Context,
    manifest: Manifest | None,
    test_all: Split,
    test: Split,
    predictions: np.ndarray,
    trigger: Trigger | None,
) -> dict[str, Any]:
    if manifest is None:
        return {"targeted": None, "backdoor": None}
    targeted = targeted_attack(ctx, manifest) if manifest.targets else None
    backdoor = None
    if manifest.backdoor is not None:
        clean = {"predictions": predictions, "labels": test.labels}
        backdoor = backdoor_attack(ctx, manifest.backdoor, test_all, trigger, clean)
    return {"targeted": targeted, "backdoor": backdoor}


def _detection(
    ctx: _Context, data: EvalData, manifest: Manifest | None
) -> list[dict[str, Any]] | None:
    if manifest is None or not data.suspicious:
        return None
    if not manifest.rows and not manifest.keys:
        ctx.notes.append("detection skipped: the manifest lists no poisoned rows")
        return None
    return poison_detection(data.suspicious, manifest, ctx.settings.detection_k)


def _header(loaded: LoadedModel, data: EvalData, classes: ClassInfo) -> dict[str, Any]:
    return {
        "checkpoint": str(loaded.checkpoint),
        "model": loaded.name,
        "epoch": loaded.epoch,
        "device": str(loaded.device),
        "test_csv": str(data.test_csv),
        "train_csv": str(data.train_csv) if data.train_csv else None,
        "manifest": str(data.manifest) if data.manifest else None,
        "classes": classes.names,
        "templates": classes.templates,
    }


def _skipped(
    data: EvalData, settings: EvalSettings, manifest: Manifest | None, train: Split | None
) -> list[str]:
    notes = []
    if manifest is None:
        notes.append("no manifest: clean accuracy only (no attack success, no detection)")
    elif not data.suspicious:
        notes.append("no suspicious_epoch_N.csv given or found: poison detection not scored")
    if train is None and settings.linear_probe is None:
        notes.append("no training CSV: linear probe not run")
    return notes
