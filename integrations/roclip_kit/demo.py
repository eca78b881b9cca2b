"""``roclip demo``: poison a captioned real dataset, train CLIP and RoCLIP, compare them.

Every step is the kit's public one, so the demo is also a worked example of using the kit on
your own data: :func:`~roclip_kit.data.datasets.build_captioned_dataset`, then
:func:`~roclip_kit.attack.poison.poison_dataset` (targeted poisoning and a backdoor in one CSV),
then two runs of OpenCLIP's real training script through the adapter
(:func:`~roclip_kit.train.openclip.train_openclip`, without and with ``--roclip``), then
:func:`~roclip_kit.evaluate.run.evaluate_checkpoint` after every epoch (attack success) and in full
after the last (zero-shot, linear probe, attack success, poison detection).

Layout of ``out`` (reruns reuse the dataset and replace the rest)::

    data/<dataset>/          the captioned dataset (train.csv, test.csv, classes.json, images/)
    poisoned/                the poisoned training CSV, manifest.json, backdoor images
    runs/clip, runs/roclip   OpenCLIP runs (checkpoints, logs, suspicious_epoch_N.csv)
    results.json             settings, per-epoch and final figures of both runs
    attack_success.png       attack success per epoch, matching epochs shaded
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from roclip_kit.plot import Chart, PlotUnavailable, Series, draw_chart
from roclip_plugin.config import preset_name

RESULTS_FILE = "results.json"
PLOT_FILE = "attack_success.png"
TRAINERS = ("tensor", "openclip")

# Sizes per scale of the tensor-resident path (the default trainer; docs/demo.md). "cpu" is
# the faithful scale-down of the paper's attacks on the full dataset, sized to train CLIP and
# RoCLIP side by side in under 10 minutes on two CPU cores; "gpu" is the same on a CUDA device
# with a larger ViT (the attacks and ratios unchanged).
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {
        "train_limit": None,
        "attribute_rate": 0.5,
        "test_limit": None,
        "epochs": 12,
        "batch_size": 256,
        "lr": 2e-3,
        "model": "tensor-cpu",
        "targets": 32,
        "captions_per_target": [10, 50],
        "backdoor_rate": 0.001,
        "trigger": "blend",
        "pool_size": 4096,
        "first_rematch_epoch": 4,
        "rematch_every": 2,
        "image_aug": "roclip-small",
        "eval_limit": 1000,
        "jobs": 2,
    },
    "gpu": {
        "train_limit": None,
        "attribute_rate": 0.5,
        "test_limit": None,
        "epochs": 12,
        "batch_size": 256,
        "lr": 2e-3,
        "model": "tensor-gpu",
        "targets": 32,
        "captions_per_target": [10, 50],
        "backdoor_rate": 0.001,
        "trigger": "blend",
        "pool_size": 4096,
        "first_rematch_epoch": 4,
        "rematch_every": 2,
        "image_aug": "roclip-small",
        "eval_limit": None,
        "jobs": 1,
    },
}

# Sizes of the OpenCLIP path (``--trainer openclip``: ``roclip-openclip-train``, the flag users
# run). "cpu" is sized to finish in under 10 minutes on two CPU cores (measured figures in
# docs/demo.md); "gpu" is the full dataset with a larger ViT.
OPENCLIP_SCALES: dict[str, dict[str, Any]] = {
    "cpu": {
        "train_limit": 5000,
        "attribute_rate": 0.25,
        "test_limit": 1000,
        "epochs": 10,
        "batch_size": 128,
        "lr": 1e-3,
        "model": "tiny-cpu",
        "targets": 8,
        "captions_per_target": 25,
        "backdoor_rate": 0.01,
        "trigger": "patch",
        # A tenth of the 5,200 pairs: a pool holding more of them hands images back their own
        # captions of an earlier epoch (docs/config.md).
        "pool_size": 512,
        "first_rematch_epoch": 6,
        "rematch_every": 2,
        # Measured (docs/demo.md): the authors' image augmentation, made for 224 px photos,
        # halved this tiny model's progress on 32 px digits in 7 epochs and RoCLIP then
        # collapsed; captions keep EDA. The gpu scale keeps the default augmentation.
        "image_aug": "none",
        "eval_limit": 500,
    },
    "gpu": {
        "train_limit": None,
        "attribute_rate": 0.5,
        "test_limit": None,
        "epochs": 30,
        "batch_size": 256,
        "lr": 1e-3,
        "model": "small-gpu",
        "targets": 16,
        "captions_per_target": 100,
        "backdoor_rate": 0.001,
        "trigger": "patch",
        "pool_size": 16384,
        "first_rematch_epoch": 5,
        "rematch_every": 2,
        "eval_limit": None,
    },
}
SCALED_FLAGS = ("pool_size", "first_rematch_epoch", "rematch_every", "image_aug")


def scaled_flags(preset: str | None) -> tuple[str, ...]:
    """The RoCLIP flags a scale sets for ``preset`` (None: the default preset).

    The scale's schedule suits the paper's preset at the scale's run length; the other presets
    keep their own schedule, and only the pool size and the augmentation are scaled.
    """
    return SCALED_FLAGS if preset_name(preset) == "paper" else ("pool_size", "image_aug")

# What a demo run writes into --out besides the dataset cache (data/): a rerun replaces these
# together, and a failed rerun puts the previous ones back (see roclip_kit.outputs.keeping).
RESULT_ENTRIES = ("poisoned", "runs", RESULTS_FILE, PLOT_FILE)
OUT_ENTRIES = ("data", *RESULT_ENTRIES)
DATASETS = ("mnist", "fashion-mnist", "digits")
TRIGGER_KINDS = ("patch", "blend", "wanet")


def scale_text(key: str, default: Any = None) -> str:
    """A size's value at every scale, as the help shows it, read from the scale tables.

    ``cpu 4096, gpu 4096; --trainer openclip: cpu 2048, gpu 16384``. A table without ``key``
    leaves ``default`` (the value that runs then), or omits the scale when there is none.
    """

    def one(table: Mapping[str, Any]) -> str | None:
        value = table.get(key, default)
        if value is None and key not in table:
            return None
        if isinstance(value, list):
            value = ",".join(map(str, value))
        return "all" if value is None else str(value)

    parts = []
    for label, tables in (("", SCALES), ("--trainer openclip: ", OPENCLIP_SCALES)):
        cells = [f"{scale} {text}" for scale, t in tables.items() if (text := one(t)) is not None]
        if cells:
            parts.append(label + ", ".join(cells))
    return "; ".join(parts)


@dataclass
class DemoSettings:
    """Everything the demo does; ``scale`` (of the ``trainer``) fills the fields left as None."""

    out: Path = Path("roclip-demo")
    dataset: str = "mnist"
    scale: str = "cpu"
    trainer: str = "tensor"
    device: str = "cpu"
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    attribute_rate: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    model: str | None = None
    targets: int | None = None
    captions_per_target: int | list[int] | None = None
    backdoor_rate: float | None = None
    backdoor_class: str | None = None
    trigger: str | None = None
    eval_limit: int | None = None
    jobs: int | None = None
    roclip_flags: dict[str, Any] = field(default_factory=dict)

    def scale_table(self) -> dict[str, Any]:
        """The sizes of ``scale`` for ``trainer``."""
        if self.trainer not in TRAINERS:
            raise ValueError(f"--trainer {self.trainer!r}: choose one of {', '.join(TRAINERS)}")
        scales = SCALES if self.trainer == "tensor" else OPENCLIP_SCALES
        if self.scale not in scales:
            raise ValueError(f"--scale {self.scale!r}: choose one of {', '.join(scales)}")
        return scales[self.scale]

    def check(self) -> DemoSettings:
        """Refuse any bad setting, naming its flag, before anything is written; returns self.

        Sizes are refused, not rewritten: ``--epochs 0`` trained one epoch and
        ``--batch-size 0`` trained at batch size 1 before.
        """
        from roclip_plugin.io import check_output_dir
        from roclip_plugin.validation import check_count, check_device, check_real

        self.scale_table()
        check_output_dir(self.out, "--out")
        _check_choice("--dataset", self.dataset, DATASETS)
        if self.trigger is not None:  # None: the scale's
            _check_choice("--trigger", self.trigger, TRIGGER_KINDS)
        check_device(self.device)
        check_count("--seed", self.seed, low=0, optional=False)
        for flag, low in (
            ("--train-limit", 1),
            ("--test-limit", 1),
            ("--epochs", 1),
            ("--batch-size", 1),
            ("--targets", 0),
            ("--eval-limit", 1),
            ("--jobs", 1),
        ):
            check_count(flag, getattr(self, flag[2:].replace("-", "_")), low=low)
        check_real("--lr", self.lr, 0.0, 10.0, low_open=True, optional=True)
        check_real("--attribute-rate", self.attribute_rate, 0.0, 1.0, optional=True)
        check_real("--backdoor-rate", self.backdoor_rate, 0.0, 1.0, high_open=True, optional=True)
        counts = self.captions_per_target
        if counts is not None:
            listed = counts if isinstance(counts, list) else [counts]
            if not listed or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in listed
            ):
                raise ValueError(
                    f"--captions-per-target {counts!r}: every count must be an integer >= 1"
                )
        if self.backdoor_class is not None:
            _check_choice("--backdoor-class", self.backdoor_class, _class_names(self.dataset))
        if self.model is not None:
            _check_model(self.model, self.trainer)
        if self.jobs is not None and self.jobs > 1 and self.trainer != "tensor":
            raise ValueError(  # it was ignored: the OpenCLIP runs go one after another
                f"--jobs {self.jobs}: --trainer {self.trainer} trains one run at a time; drop "
                "--jobs, or use --trainer tensor to train the runs side by side"
            )
        if self.scale == "gpu" and not str(self.device).startswith("cuda"):
            raise ValueError(
                f"--scale gpu trains a larger ViT sized for a GPU, hours on --device "
                f"{self.device}; add --device cuda, or use --scale cpu"
            )
        return self

    def train_settings(self, threads: int | None = None) -> Any:
        """The tensor path's training settings of these (resolved) settings.

        The one place a demo, benchmark or scan run gets its recipe (epochs, batch, learning
        rate, seed, device, model), so the three cannot drift apart.
        """
        from roclip_kit.train.tensor import TensorTrainSettings

        return TensorTrainSettings(
            epochs=int(self.epochs or 1),
            batch_size=int(self.batch_size or 1),
            lr=float(self.lr or 1e-3),
            seed=self.seed,
            device=self.device,
            preset=str(self.model),
            threads=threads,
        )

    def resolved(self) -> DemoSettings:
        """A copy with every size taken from the scale where not given."""
        defaults = self.scale_table()
        values = {
            key: defaults[key]
            for key in defaults
            if key in self.__dataclass_fields__ and getattr(self, key) is None
        }
        scaled = scaled_flags(self.roclip_flags.get("preset"))
        flags = {
            key: defaults[key] for key in scaled if key in defaults and key not in self.roclip_flags
        }
        return replace(self, **values, roclip_flags={**flags, **self.roclip_flags})


@dataclass
class RunFigures:
    """One training run's figures: per epoch attack success, and the final evaluation.

    ``matching`` (tensor path) holds, per 1-based matching epoch, what matching did: purity,
    the share of poisoned images matched to their poison's class, self-matches.
    """

    name: str
    roclip: bool
    train_seconds: float
    eval_seconds: float
    matching_epochs: list[int]
    per_epoch: dict[int, dict[str, Any]]
    final: dict[str, Any]
    matching: dict[int, dict[str, Any]] = field(default_factory=dict)
    pairs_per_second: float | None = None

    def summary(self) -> dict[str, Any]:
        """The table's figures (fractions), from the final evaluation."""
        final = self.final
        probe = final.get("linear_probe") or {}
        backdoor = final.get("backdoor") or {}
        detection = final.get("detection") or []
        groups = (final.get("targeted") or {}).get("by_captions") or {}
        return {
            **_epoch_figures(final),
            "targeted_by_captions": {k: v["success_rate"] for k, v in groups.items()},
            "linear_probe": probe.get("accuracy"),
            "backdoor_clean_target_rate": backdoor.get("clean_target_rate"),
            "detection_precision": detection[-1]["precision"] if detection else None,
            "detection_recall": detection[-1]["recall"] if detection else None,
            "purity": _mean_of(self.matching, "purity"),
            "poison_class": _mean_of(self.matching, "poison_class"),
        }


def _mean_of(matching: Mapping[int, Mapping[str, Any]], key: str) -> float | None:
    values = [m[key] for m in matching.values() if m.get(key) is not None]
    return sum(values) / len(values) if values else None


Say = Callable[[str], None]


def run_demo(settings: DemoSettings, *, say: Say = print, progress: Any = None) -> dict[str, Any]:
    """Run the whole demo; returns what ``results.json`` holds."""
    from roclip_kit.outputs import check_replaceable, keeping
    from roclip_plugin import get_plugin_manager
    from roclip_plugin.augment import check_policy_names
    from roclip_plugin.config import RoClipConfig

    s = settings.check().resolved().check()
    config = RoClipConfig.from_preset(
        s.roclip_flags.get("preset", "default"),
        **{k: v for k, v in s.roclip_flags.items() if k != "preset"},
    )  # bad RoCLIP flags fail here, before minutes of data building
    # and unknown augmentation names (they are built in training)
    check_policy_names(config, get_plugin_manager())
    out = check_replaceable(Path(s.out), "--out", "roclip demo", OUT_ENTRIES, lambda _: True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    folder = data_folder(s, out)
    dataset = build_data(s, folder, say=say, progress=progress)
    if "pool_size" not in settings.roclip_flags:  # the scale's: fit it to this data
        s = fit_pool(s, config, epoch_pairs(s, dataset.train_count), say=say)
    with keeping(out, RESULT_ENTRIES):  # a failure from here on restores the last results
        results = _poison_train_evaluate(s, out, dataset, start, say=say, progress=progress)
    drop_other_data(folder)  # the results that used them are replaced now
    return results


def epoch_pairs(s: DemoSettings, train_count: int) -> int:
    """Training pairs of an epoch once poisoned: targeted rows are added, backdoors replace."""
    from roclip_kit.attack.choose import caption_counts

    targets = int(s.targets or 0)
    return train_count + (sum(caption_counts(s.captions_per_target, targets)) if targets else 0)


def fit_pool(s: DemoSettings, config: Any, pairs: int, *, say: Say = print) -> DemoSettings:
    """``s`` with the scale's pool lowered where it would hold too much of an epoch.

    The scales are sized for the full datasets; on a small one (digits, or a ``--train-limit``)
    the same pool would hold most of an epoch, handing images their own captions back (the
    warning of :func:`roclip_plugin.checks.pool_share_message`). The pool becomes the largest
    power of two within the limit; a pool the user gave is never changed.
    """
    from roclip_plugin.checks import POOL_SHARE_LIMIT, pool_share_message

    if pool_share_message(config, pairs) is None:
        return s
    size = 1 << max(int(POOL_SHARE_LIMIT * pairs), 1).bit_length() - 1
    say(
        f"pool size {size}: the scale's {config.pool_size} would hold "
        f"{config.pool_size / pairs:.0%} of this data's {pairs} training pairs per epoch "
        "(--roclip-pool-size sets it)"
    )
    return replace(s, roclip_flags={**s.roclip_flags, "pool_size": size})


def data_folder(s: DemoSettings, out: Path) -> Path:
    """The data cache for ``s``'s build options: one folder per set of options.

    A rerun with other options builds into a new folder, so the previous results (put back if
    the rerun fails) still point at images that exist; :func:`drop_other_data` removes the
    folders of other options once a rerun has succeeded.
    """
    options = {
        "dataset": s.dataset,
        "seed": s.seed,
        "train_limit": s.train_limit,
        "test_limit": s.test_limit,
        "attribute_rate": s.attribute_rate,
    }
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    return out / "data" / f"{s.dataset}-{key}"


def drop_other_data(folder: Path) -> None:
    """Remove the data caches beside ``folder`` (those of other options; ``data/`` is ours)."""
    for other in folder.parent.iterdir():
        if other != folder and other.is_dir() and not other.name.startswith("."):
            shutil.rmtree(other)


def _poison_train_evaluate(
    s: DemoSettings, out: Path, dataset: Any, start: float, *, say: Say, progress: Any
) -> dict[str, Any]:
    """The demo after the data: poison, train both runs, evaluate, write results and plot."""
    poisoned = poison(s, dataset, out / "poisoned", say=say, progress=progress)
    pairs = (("CLIP", False), ("RoCLIP", True))
    if s.trainer == "openclip":
        runs = [
            train_and_evaluate(s, out, poisoned, name, roclip, say=say, progress=progress)
            for name, roclip in pairs
        ]
    else:
        variants = [(name, s.roclip_flags if roclip else None, True) for name, roclip in pairs]
        runs = train_tensor_runs(s, out, poisoned, variants, say=say, progress=progress)
    results = {
        "settings": _jsonable(asdict(s)),
        "dataset": {
            "name": dataset.name,
            "train": dataset.train_count,
            "test": dataset.test_count,
            "dir": str(dataset.root),
        },
        "poison": _poison_summary(poisoned.manifest, dataset.train_count),
        "runs": [asdict(r) | {"summary": r.summary()} for r in runs],
        "verdicts": verdicts(runs),
        "wall_seconds": time.perf_counter() - start,
    }
    _write_json(out / RESULTS_FILE, results)
    plot_attack_success(runs, out / PLOT_FILE, dataset.name, say=say, eval_images=s.eval_limit)
    return results


def _check_choice(flag: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def _class_names(dataset: str) -> list[str]:
    """Class names of a source without loading its images (the backdoor class is one)."""
    from roclip_kit.data.captions import _digit_vocabulary, _fashion_vocabulary

    vocabulary = _fashion_vocabulary() if dataset == "fashion-mnist" else _digit_vocabulary()
    return vocabulary.classes


def _check_model(model: str, trainer: str) -> None:
    """A model preset of the trainer (the tensor path's or roclip_kit.train.openclip's)."""
    if trainer == "tensor":
        from roclip_kit.train.tensor import TENSOR_PRESETS as presets
    else:
        from roclip_kit.train.openclip import PRESETS as presets
    if model not in presets:
        raise ValueError(
            f"--model {model!r} is not a model preset of --trainer {trainer}; choose one of "
            f"{', '.join(presets)}"
        )


def build_data(s: DemoSettings, folder: Path, *, say: Say = print, progress: Any = None) -> Any:
    """Build (or reuse) the captioned dataset ``s`` names in ``folder``."""
    from roclip_kit.data.datasets import build_captioned_dataset

    info = build_captioned_dataset(
        s.dataset,
        folder,
        seed=s.seed,
        train_limit=s.train_limit,
        test_limit=s.test_limit,
        attribute_rate=1.0 if s.attribute_rate is None else s.attribute_rate,
        progress=progress,
    )
    verb = "reused" if info.reused else f"built in {info.seconds:.0f} s"
    say(f"dataset {info.name}: {info.train_count} train / {info.test_count} test images, {verb}")
    return info


def poison(
    s: DemoSettings, dataset: Any, folder: Path, *, say: Say = print, progress: Any = None
) -> Any:
    """Write the poisoned copy of ``dataset`` (targeted and backdoor, per ``s``) to ``folder``."""
    from roclip_kit.attack.poison import poison_dataset
    from roclip_kit.attack.triggers import make_trigger

    result = poison_dataset(
        folder,
        dataset_dir=dataset.root,
        targets=s.targets or 0,
        captions_per_target=s.captions_per_target or 0,
        backdoor_rate=s.backdoor_rate or None,
        backdoor_class=_backdoor_class(s, dataset.classes),
        trigger=make_trigger(s.trigger or "patch", seed=s.seed) if s.backdoor_rate else None,
        seed=s.seed,
        progress=progress,
    )
    summary = _poison_summary(result.manifest, dataset.train_count)
    say(
        f"poisoned: {summary['targets']} targets x {summary['captions_per_target']} captions, "
        f"backdoor on {summary['backdoor_rows']} images ({summary['backdoor_class']}); "
        f"{summary['poisoned_rows']} poisoned rows"
    )
    return result


def _backdoor_class(s: DemoSettings, classes: list[str]) -> str | None:
    """The given class, or one drawn from the seed (never silently the same for every seed)."""
    if not s.backdoor_rate:
        return None
    if s.backdoor_class is not None:
        return s.backdoor_class
    import random

    return classes[random.Random(s.seed).randrange(len(classes))]


def _poison_summary(manifest: Mapping[str, Any], train_count: int) -> dict[str, Any]:
    targeted = manifest.get("targeted") or {}
    backdoor = manifest.get("backdoor") or {}
    return {
        "targets": len(targeted.get("targets", [])),
        "captions_per_target": targeted.get("captions_per_target", 0),  # int, or a list
        "backdoor_rows": backdoor.get("count", 0),
        "backdoor_rate": backdoor.get("count", 0) / max(train_count, 1),
        "backdoor_class": backdoor.get("target_class"),
        "trigger": (backdoor.get("trigger") or {}).get("kind"),
        "poisoned_rows": len(manifest.get("rows", [])),
    }


def train_and_evaluate(
    s: DemoSettings,
    out: Path,
    poisoned: Any,
    name: str,
    roclip: bool,
    *,
    say: Say = print,
    progress: Any = None,
) -> RunFigures:
    """Train one run (``out/runs/<name>``) on the poisoned data and evaluate every epoch.

    ``s`` must be resolved (:meth:`DemoSettings.resolved`); ``s.roclip_flags`` configure the
    RoCLIP run. The label in tables is ``name`` as given ("CLIP", "RoCLIP (reference)", ...).
    """
    from roclip_kit.train.openclip import TrainSettings, train_openclip

    folder = _folder_name(name)
    run_dir = out / "runs" / folder
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a rerun replaces the run (train_openclip refuses to overwrite)
    settings = TrainSettings(
        out_dir=out / "runs",
        name=folder,
        dataset_dir=poisoned.out_dir,
        roclip=roclip,
        roclip_flags=dict(s.roclip_flags) if roclip else {},
        preset=str(s.model),
        epochs=int(s.epochs or 1),
        batch_size=int(s.batch_size or 1),
        lr=float(s.lr or 1e-3),
        seed=s.seed,
        device=s.device,
    )
    label = name
    say(f"training {label} ({settings.epochs} epochs on {s.device})")
    task = progress.add_task(f"train {label}", total=None) if progress else None
    result = train_openclip(settings, on_output=_epoch_progress(progress, task, settings.epochs))
    if progress is not None and task is not None:
        progress.remove_task(task)
    eval_start = time.perf_counter()
    per_epoch, final = _evaluate_run(s, poisoned, result, label, progress)
    figures = RunFigures(
        name=label,
        roclip=roclip,
        train_seconds=result.wall_seconds,
        eval_seconds=time.perf_counter() - eval_start,
        matching_epochs=sorted(result.suspicious),
        per_epoch=per_epoch,
        final=final,
    )
    say(
        f"{label}: trained in {result.wall_seconds:.0f} s, "
        f"evaluated in {figures.eval_seconds:.0f} s"
    )
    return figures


def train_tensor_runs(
    s: DemoSettings,
    out: Path,
    poisoned: Any,
    variants: list[tuple[str, dict[str, Any] | None, bool]],
    *,
    say: Say = print,
    progress: Any = None,
) -> list[RunFigures]:
    """Train and evaluate runs on the tensor-resident path, ``s.jobs`` at a time.

    Args:
        s: resolved settings (sizes, device, seed).
        out: the demo folder; each run writes ``out/runs/<name>``.
        poisoned: the poisoned dataset (:func:`poison`'s result).
        variants: ``(label, RoCLIP flags or None for CLIP, defend)``; ``defend=False`` applies
            only the flags' augmentation.
        say: where per-epoch lines go.
        progress: an optional rich progress display (a bar per run).
    """
    from roclip_kit.tensor_runs import RunSpec, default_threads, run_specs

    jobs = int(s.jobs or 1)
    train = s.train_settings(default_threads(jobs) if s.device == "cpu" else None)
    specs = []
    for name, flags, defend in variants:
        run_dir = out / "runs" / _folder_name(name)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a rerun replaces the run
        specs.append(
            RunSpec(
                name=name,
                dataset_dir=poisoned.out_dir,
                manifest=poisoned.manifest_path,
                train=train,
                roclip_flags=flags,
                defend=defend,
                run_dir=run_dir,
                eval_limit=s.eval_limit,
                eval_seed=s.seed,
            )
        )
    say(
        f"training {', '.join(v[0] for v in variants)} ({train.epochs} epochs on {s.device}, "
        f"{min(jobs, len(specs))} at a time)"
    )
    bars = RunBars(progress, [spec.name for spec in specs], train.epochs)

    def on_event(event: dict[str, Any]) -> None:
        bars.advance(event["run"])
        if event.get("final_evaluation"):
            bars.evaluating(event["run"])
            say(f"{event['run']}: trained; final evaluation on the whole test split")
        else:
            say(_epoch_line(event))

    results = run_specs(specs, jobs, on_event, lambda i, _: bars.advance(specs[i].name))
    bars.close()
    figures = [_tensor_figures(r) for r in results]
    for f in figures:
        say(f"{f.name}: trained in {f.train_seconds:.0f} s ({f.pairs_per_second:.0f} pairs/s)")
    return figures


class RunBars:
    """A bar per run (its epochs, then its final evaluation) and one for the whole demo.

    Each bar counts epochs plus one unit for the final evaluation, so the time-left estimate
    of each run and of the whole demo covers the evaluation too. Without a progress display
    (``progress`` None) every call does nothing.
    """

    def __init__(self, progress: Any, runs: list[str], epochs: int) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.total: Any = None
        if progress is None:
            return
        self.tasks = {run: progress.add_task(f"train {run}", total=epochs + 1) for run in runs}
        if len(runs) > 1:
            self.total = progress.add_task("whole demo", total=len(runs) * (epochs + 1))

    def advance(self, run: str) -> None:
        """One unit (an epoch or the final evaluation) of ``run`` is done."""
        if run in self.tasks:
            self.progress.advance(self.tasks[run])
            if self.total is not None:
                self.progress.advance(self.total)

    def evaluating(self, run: str) -> None:
        """``run`` has trained and its final evaluation started: its bar says so."""
        if run in self.tasks:
            self.progress.update(self.tasks[run], description=f"evaluate {run}")

    def close(self) -> None:
        """Remove every bar (the display is transient: the table follows)."""
        for task in [*self.tasks.values(), self.total]:
            if task is not None:
                self.progress.remove_task(task)


def _epoch_line(event: dict[str, Any]) -> str:
    """``RoCLIP epoch 6 (matching): zero-shot 91.2%, targeted 3.1%, backdoor 0.4%, ...``.

    A defended epoch of a preset that does not match (``robust`` drops) reads ``(defended)``.
    """
    parts = [f"zero-shot {_pct(event.get('zero_shot'))}"]
    for key, label in (("targeted_asr", "targeted"), ("backdoor_asr", "backdoor")):
        if event.get(key) is not None:
            parts.append(f"{label} {_pct(event[key])}")
    if event.get("purity") is not None:
        parts.append(f"matching purity {_pct(event['purity'])}")
    kind = ""
    if event.get("matching"):  # drop, unimodal and weight re-pair no caption
        kind = " (matching)" if event.get("action", "match") == "match" else " (defended)"
    return f"{event['run']} epoch {event['epoch']}{kind}: " + ", ".join(parts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _tensor_figures(result: dict[str, Any]) -> RunFigures:
    return RunFigures(
        name=result["name"],
        roclip=result["roclip"],
        train_seconds=result["train_seconds"],
        eval_seconds=result["eval_seconds"],
        matching_epochs=result["matching_epochs"],
        per_epoch={int(k): v for k, v in result["per_epoch"].items()},
        final=result["final"],
        matching={int(k): v for k, v in result["matching"].items()},
        pairs_per_second=result["pairs_per_second"],
    )


def _folder_name(name: str) -> str:
    """A run's folder from its label: "RoCLIP (reference)" -> "roclip-reference"."""
    cleaned = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in cleaned.split("-") if part) or "run"


def _epoch_progress(progress: Any, task: Any, epochs: int) -> Callable[[str], None] | None:
    """Advance a progress bar from OpenCLIP's "Train Epoch: N" console lines."""
    if progress is None or task is None:
        return None
    progress.update(task, total=epochs)

    def on_output(line: str) -> None:
        if "Train Epoch:" in line and "100%" in line:
            progress.advance(task)

    return on_output


def _evaluate_run(
    s: DemoSettings, poisoned: Any, result: Any, label: str, progress: Any
) -> tuple[dict[int, dict[str, float | None]], dict[str, Any]]:
    """Attack success after every epoch; the full evaluation after the last.

    The model is built once and each epoch's weights are loaded into it.
    """
    from roclip_kit.evaluate.run import EvalData, EvalSettings, evaluate_model
    from roclip_kit.train.models import load_openclip, reload_checkpoint

    last = max(result.checkpoints)
    quick = EvalSettings(
        linear_probe=False, test_limit=s.eval_limit, backdoor_limit=s.eval_limit, seed=s.seed
    )
    full = EvalSettings(seed=s.seed, backdoor_limit=s.eval_limit)
    data = EvalData.from_dataset_dir(poisoned.out_dir, manifest=poisoned.manifest_path)
    suspicious = tuple(result.suspicious[e] for e in sorted(result.suspicious))
    task = progress.add_task(f"evaluate {label}", total=last) if progress else None
    loaded = None
    per_epoch: dict[int, dict[str, float | None]] = {}
    final: dict[str, Any] = {}
    for epoch, checkpoint in sorted(result.checkpoints.items()):
        if loaded is None:
            loaded = load_openclip(checkpoint, result.model_name, s.device)
        else:
            loaded = reload_checkpoint(loaded, checkpoint)
        if epoch == last:
            final = evaluate_model(loaded, replace(data, suspicious=suspicious), full)
            per_epoch[epoch] = _epoch_figures(final)
        else:
            per_epoch[epoch] = _epoch_figures(evaluate_model(loaded, data, quick))
        if progress is not None and task is not None:
            progress.advance(task)
    if progress is not None and task is not None:
        progress.remove_task(task)
    return per_epoch, final


def _epoch_figures(evaluation: Mapping[str, Any]) -> dict[str, float | None]:
    """Clean zero-shot and both attacks' success of one evaluation (None: attack absent)."""
    targeted = evaluation.get("targeted") or {}
    backdoor = evaluation.get("backdoor") or {}
    return {
        "zero_shot": evaluation["zero_shot"]["accuracy"],
        "targeted_asr": targeted.get("success_rate"),
        "backdoor_asr": backdoor.get("success_rate"),
    }


COLLAPSE_POINTS = 5.0  # clean zero-shot this far below CLIP's: the defense "won" by breaking


ATTACK_TOOK_HOLD = 0.5  # CLIP's attack success below this: the run cannot show a defense


def verdicts(runs: list[RunFigures]) -> list[str]:
    """Plain-language readings of the table that a reader must not miss.

    A defended model with low attack success but much lower clean accuracy than CLIP has not
    resisted the attack; it has stopped learning the task. Nor does a run show a defense when
    CLIP itself never learned the task or the attack never took hold on CLIP. Say so instead of
    letting the ASR column speak alone.
    """
    clip = next((r for r in runs if not r.roclip), None)
    if clip is None:
        return []
    base = clip.summary()
    classes = len(clip.final["zero_shot"].get("per_class") or {}) or 10
    if base["zero_shot"] < 2.0 / classes:
        return [
            f"CLIP reached only {100 * base['zero_shot']:.1f}% zero-shot (chance "
            f"{100 / classes:.0f}%): the models did not learn the task, so no attack or "
            "defense figure of this run means anything; train longer or on more data"
        ]
    notes = []
    for run in (r for r in runs if r.roclip):
        notes += _run_verdicts(run, base)
    return notes


def _run_verdicts(run: RunFigures, base: dict[str, float | None]) -> list[str]:
    figures = run.summary()
    drop = 100 * (base["zero_shot"] - figures["zero_shot"])
    if drop > COLLAPSE_POINTS:
        return [
            f"{run.name}: clean zero-shot {drop:.1f} points below CLIP's: its attack "
            "success is not robustness (the model lost the task); see docs/demo.md"
        ]
    notes = []
    for key, attack in (("targeted_asr", "targeted"), ("backdoor_asr", "backdoor")):
        before, after = base[key], figures[key]
        if before is None or after is None:
            continue
        if before < ATTACK_TOOK_HOLD:
            notes.append(
                f"the {attack} attack did not take hold on CLIP ({100 * before:.1f}%): this "
                f"run cannot show a defense against it"
            )
        elif after < before:
            notes.append(
                f"{run.name} cut {attack} attack success from {100 * before:.1f}% to "
                f"{100 * after:.1f}% with clean zero-shot within {COLLAPSE_POINTS:g} points"
            )
        else:
            notes.append(
                f"{run.name} did not cut {attack} attack success ({100 * before:.1f}% for "
                f"CLIP, {100 * after:.1f}%)"
            )
    return notes


PURITY_COLOUR = (44, 160, 44)


def plot_attack_success(
    runs: list[RunFigures],
    path: Path,
    dataset: str,
    *,
    say: Say = print,
    eval_images: int | None = None,
) -> Path | None:
    """Attack success, clean zero-shot and matching purity per epoch; matching shaded.

    ``eval_images``: the test images of each per-epoch check (the demo's ``eval_limit``; None:
    the whole test split), written under the axis so the lines are not read as final figures.

    Without matplotlib the demo's figures are all in results.json already: the plot is
    skipped (an older one at ``path`` removed, so it is never taken for this run's) and
    ``say`` tells how to get it. Returns the plot's path, or None when it was not drawn.
    """
    colours = {False: (31, 119, 180), True: (214, 39, 40)}
    series = []
    for run in runs:
        for key, kind, dashed in (
            ("targeted_asr", "targeted", False),
            ("backdoor_asr", "backdoor", True),
        ):
            values = {e: f[key] for e, f in run.per_epoch.items() if f.get(key) is not None}
            if values:
                series.append(Series(f"{run.name} {kind}", values, dashed, colours[run.roclip]))
        values = {
            e: f["zero_shot"] for e, f in run.per_epoch.items() if f.get("zero_shot") is not None
        }
        series.append(Series(f"{run.name} zero-shot", values, True, _light(colours[run.roclip])))
        purity = {e: m["purity"] for e, m in run.matching.items() if m.get("purity") is not None}
        if purity:
            series.append(Series(f"{run.name} matching purity", purity, False, PURITY_COLOUR))
    shaded = next((r.matching_epochs for r in runs if r.roclip), [])
    checked = "all test images" if eval_images is None else f"{eval_images:,} test images"
    chart = Chart(
        f"Poisoned {dataset}: attack success and clean accuracy",
        series,
        shaded,
        x_label=f"epoch (each epoch checked on {checked})",
        y_label="share of images",
    )
    try:
        return draw_chart(chart, path)
    except PlotUnavailable as err:
        path.unlink(missing_ok=True)
        say(f"plot not drawn: {err}")
        return None


def _light(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = colour
    return (r + (255 - r) // 2, g + (255 - g) // 2, b + (255 - b) // 2)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    import json

    path.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False))
