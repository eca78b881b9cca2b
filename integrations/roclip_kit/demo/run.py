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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from roclip_kit.demo.report import (
    RunFigures,
    Say,
    _epoch_figures,
    _jsonable,
    _write_json,
    plot_attack_success,
    verdicts,
)
from roclip_kit.demo.settings import (
    OUT_ENTRIES,
    PLOT_FILE,
    RESULT_ENTRIES,
    RESULTS_FILE,
    DemoSettings,
    defense_verb,
)


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
    label = f"RoCLIP {defense_verb(s.roclip_flags)}"
    plot_attack_success(
        runs, out / PLOT_FILE, dataset.name, say=say, eval_images=s.eval_limit, shade_label=label
    )
    return results


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
        defended_epochs=sorted(result.suspicious),
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
    from roclip_kit.demo.runs import RunSpec, default_threads, run_specs

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
    from roclip_plugin.config_aliases import saved_defended_epochs

    return RunFigures(
        name=result["name"],
        roclip=result["roclip"],
        train_seconds=result["train_seconds"],
        eval_seconds=result["eval_seconds"],
        defended_epochs=saved_defended_epochs(result, []),
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
