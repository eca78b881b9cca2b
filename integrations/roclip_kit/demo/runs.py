"""Runs of the tensor-resident path as jobs: train, evaluate every epoch, report, in parallel.

A :class:`RunSpec` names everything one run needs (dataset directory, manifest, training
settings, RoCLIP flags), so it can travel to another process: on a CPU with two cores, two
single-threaded runs side by side train about 1.4 times as many pairs a second as one
two-threaded run (the models are small), and on a GPU several small runs share the device.
:func:`run_specs` runs a list of them with ``processes`` workers (``spawn``: each worker loads
the dataset itself, a few seconds) and returns one JSON-able result per spec, in order.

Each run is evaluated with :func:`roclip_kit.evaluate.run.evaluate_model` after every epoch (attack
success and clean zero-shot on ``eval_limit`` test images) and in full after the last (every
test image, the linear probe, attack success, poison detection from the run's own
``suspicious_epoch_N.csv``), exactly as ``roclip eval`` scores a checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from roclip_kit.train.tensor import TensorTrainSettings

FINAL_CHECKPOINT = "final.pt"
Event = dict[str, Any]
OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class RunSpec:
    """One run of the tensor path, picklable.

    Attributes:
        name: label in tables ("CLIP", "RoCLIP", ...).
        dataset_dir: a (poisoned) captioned dataset directory.
        manifest: the poison manifest (default: the directory's ``manifest.json``).
        train: training settings.
        roclip_flags: RoCLIP fields (a ``preset`` key picks the preset); None trains CLIP.
        defend: with ``roclip_flags``, run the defense; False applies only their
            augmentation (the "augmentation alone" ablation).
        run_dir: where the run's files go (suspicious CSVs, the final checkpoint).
        eval_limit: test images scored after each epoch (None: all).
        final_probe_limit: clean training images of the final linear probe.
        eval_seed: seed of the evaluation's subsets.
        clean_only: train on the clean rows only (the poisoned ones removed by the manifest):
            the floor an attack's success is read against.
        resumable: keep the newest epoch checkpoint and the per-epoch figures in ``run_dir``
            while the run trains, and continue from them when the same spec runs again (a
            benchmark grid outlives the session that started it); both are removed once the
            run has finished. False trains from scratch, as the demo does.
    """

    name: str
    dataset_dir: Path
    manifest: Path | None
    train: TensorTrainSettings
    roclip_flags: Mapping[str, Any] | None
    run_dir: Path
    defend: bool = True
    eval_limit: int | None = 1000
    final_probe_limit: int | None = 5000
    eval_seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    clean_only: bool = False
    resumable: bool = False

    @property
    def roclip(self) -> bool:
        """Whether the run trains with RoCLIP's defense."""
        return self.roclip_flags is not None and self.defend

    def config(self) -> Any:
        """The RoCLIP configuration of ``roclip_flags`` (None for CLIP)."""
        if self.roclip_flags is None:
            return None
        from roclip_plugin.config import RoClipConfig

        flags = dict(self.roclip_flags)
        return RoClipConfig.from_preset(flags.pop("preset", "default"), **flags)


def _epoch_figures(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Clean zero-shot and both attacks' success of one evaluation (None: attack absent)."""
    targeted = evaluation.get("targeted") or {}
    backdoor = evaluation.get("backdoor") or {}
    groups = targeted.get("by_captions") or {}
    return {
        "zero_shot": evaluation["zero_shot"]["accuracy"],
        "targeted_asr": targeted.get("success_rate"),
        "targeted_by_captions": {k: v["success_rate"] for k, v in groups.items()},
        "backdoor_asr": backdoor.get("success_rate"),
    }


def run_spec(spec: RunSpec, events: Any = None, on_weights: Any = None) -> dict[str, Any]:
    """Train and evaluate one run; returns its figures (JSON-able).

    ``events`` (a queue, or None) receives ``{"run", "epoch", "epochs", ...}`` after each epoch
    and ``{"run", "final_evaluation": True}`` when the final evaluation starts (it takes about
    as long as an epoch on a CPU, so a display can say what is going on).
    ``on_weights`` goes to :func:`~roclip_kit.train.tensor.train_tensor` (the weights after
    each optimiser step).
    """
    from roclip_kit.data.tensors import load_poisoned
    from roclip_kit.evaluate.run import EvalData, EvalSettings, evaluate_model
    from roclip_kit.train.tensor import loaded_model, train_tensor

    data = load_poisoned(spec.dataset_dir, spec.manifest)
    eval_data = EvalData.from_dataset_dir(data.root, manifest=data.manifest)
    quick = EvalSettings(
        linear_probe=False,
        test_limit=spec.eval_limit,
        backdoor_limit=spec.eval_limit,
        seed=spec.eval_seed,
    )
    # what a defended epoch does to its risky pairs: the display says "matching" or "defended"
    action = spec.config().match_action if spec.roclip else None
    saved = _Progress(spec.run_dir) if spec.resumable else None
    per_epoch: dict[int, dict[str, Any]] = saved.figures() if saved else {}
    eval_seconds = [saved.eval_seconds() if saved else 0.0]
    if events is not None:  # a resumed run's bars start where it stopped
        for epoch, figures in sorted(per_epoch.items()):
            events.put({"run": spec.name, "epoch": epoch, "action": action} | figures)

    def on_epoch(record: Any, model: Any, tokenizer: Any) -> None:
        start = time.perf_counter()
        cfg = {"vision_cfg": {"image_size": int(data.train.images.shape[-1])}}
        loaded = loaded_model(
            model, tokenizer, cfg, name=spec.name, checkpoint=spec.run_dir, epoch=record.epoch + 1
        )
        figures = _epoch_figures(evaluate_model(loaded, eval_data, quick))
        model.train()
        eval_seconds[0] += time.perf_counter() - start
        per_epoch[record.epoch + 1] = {**figures, **_record_figures(record)}
        if saved is not None:
            saved.write(per_epoch, eval_seconds[0])
        if events is not None:
            events.put(
                {"run": spec.name, "epoch": record.epoch + 1, "action": action}
                | per_epoch[record.epoch + 1]
            )

    run = train_tensor(
        data.without_poison() if spec.clean_only else data,
        spec.train,
        spec.config(),
        defend=spec.defend,
        name=spec.name,
        run_dir=spec.run_dir,
        on_epoch=on_epoch,
        on_weights=on_weights,
        **(saved.train_options() if saved else {}),
    )
    if events is not None:
        events.put({"run": spec.name, "final_evaluation": True})
    start = time.perf_counter()
    checkpoint = run.save(spec.run_dir / FINAL_CHECKPOINT)
    # a clean-only run's rows are not the manifest's: its suspicious files score nothing
    last = max(run.suspicious) if run.suspicious and not spec.clean_only else None
    final_data = replace(eval_data, suspicious=(run.suspicious[last],) if last else ())
    full = EvalSettings(probe_limit=spec.final_probe_limit, seed=spec.eval_seed)
    loaded = loaded_model(
        run.model,
        run.tokenizer,
        run.cfg,
        name=spec.name,
        checkpoint=checkpoint,
        epoch=len(run.epochs),
    )
    final = evaluate_model(loaded, final_data, full)
    eval_seconds[0] += time.perf_counter() - start
    if saved is not None:
        saved.clear()
    return {
        "name": spec.name,
        "roclip": spec.roclip,
        "augmented": spec.roclip_flags is not None,
        "flags": dict(spec.roclip_flags or {}),
        "extra": dict(spec.extra),
        "train_seconds": run.train_seconds,
        "eval_seconds": eval_seconds[0],
        "pairs_per_second": run.pairs_per_second,
        "defended_epochs": run.defended_epochs,
        "per_epoch": per_epoch,
        "matching": {r.epoch + 1: r.audit for r in run.epochs if r.audit},
        "alignment": _alignment(run.roclip_state),
        "final": final,
        "checkpoint": str(checkpoint),
        "settings": {k: v for k, v in asdict(spec.train).items() if k != "preset"}
        | {"preset": spec.train.preset if isinstance(spec.train.preset, str) else "custom"},
    }


class _Progress:
    """A resumable run's state between sessions: the newest checkpoint and its epochs' figures.

    Their evaluation ran in the session that trained them, and the checkpoint holds the
    weights, not the figures.
    """

    def __init__(self, run_dir: Path) -> None:
        self.checkpoints = run_dir / "checkpoints"
        self.path = run_dir / "per_epoch.json"

    def train_options(self) -> dict[str, Any]:
        """``train_tensor``'s options: checkpoint every epoch, keep one, resume if one exists."""
        from roclip_torch.checkpoint import latest_checkpoint

        return {
            "checkpoint_dir": self.checkpoints,
            "keep_last": 1,
            "resume": latest_checkpoint(self.checkpoints) is not None,
        }

    def _completed(self) -> int:
        from roclip_torch.checkpoint import list_checkpoints

        found = list_checkpoints(self.checkpoints)
        return found[-1][0] if found else 0

    def _saved(self) -> dict[str, Any]:
        if not self._completed() or not self.path.is_file():
            return {}
        return json.loads(self.path.read_text())

    def figures(self) -> dict[int, dict[str, Any]]:
        """The per-epoch figures of the epochs the newest checkpoint holds.

        An epoch is evaluated before its checkpoint is written: figures of an epoch past the
        checkpoint belong to an epoch that trains again on resume, and are dropped.
        """
        done = self._completed()
        saved = self._saved().get("per_epoch", {})
        return {int(k): v for k, v in saved.items() if int(k) <= done}

    def eval_seconds(self) -> float:
        return float(self._saved().get("eval_seconds", 0.0))

    def write(self, per_epoch: Mapping[int, Any], eval_seconds: float) -> None:
        """Called after each epoch's evaluation, before the epoch's checkpoint is written."""
        from roclip_plugin.io import atomic_write_text

        body = {
            "per_epoch": {str(k): v for k, v in per_epoch.items()},
            "eval_seconds": eval_seconds,
        }
        atomic_write_text(self.path, json.dumps(body))

    def clear(self) -> None:
        """A finished run's figures are in its result: its resume state goes."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.path.unlink(missing_ok=True)


def _alignment(state: Mapping[str, Any] | None) -> dict[int, float]:
    """In-batch image-to-text retrieval accuracy per 1-based plain epoch (``adaptive`` reads it)."""
    if state is None:
        return {}
    return {int(unit) + 1: float(acc) for unit, acc in state["schedule"]["alignment"].items()}


def _record_figures(record: Any) -> dict[str, Any]:
    audit = record.audit or {}
    return {
        "loss": record.loss,
        "seconds": record.seconds,
        "matching": record.matching,
        "purity": audit.get("purity"),
        "poison_class": audit.get("poison_class"),
        "self_matches": audit.get("self_matches"),
    }


class RunsFailed(RuntimeError):
    """Some runs raised; the others finished and were reported."""


def run_specs(
    specs: Sequence[RunSpec],
    processes: int = 1,
    on_event: OnEvent | None = None,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every spec, ``processes`` at a time; results in the order of ``specs``.

    With one process the runs go one after another in this process (and use every thread
    torch is given); with more, each worker process trains one run at a time. ``on_event``
    receives the per-epoch events and ``on_result(index, result)`` each run as it finishes
    (so a long grid can save what it has), both in this process. A run that raises does not
    stop the others: once all are done, :class:`RunsFailed` names each failed run and its
    error (the first error is its cause).
    """
    if processes < 1:
        raise ValueError(f"--jobs must be at least 1, got {processes}")
    results: dict[int, dict[str, Any]] = {}
    errors: dict[int, BaseException] = {}

    def done(index: int, outcome: Callable[[], dict[str, Any]]) -> None:
        try:
            results[index] = outcome()
            if on_result is not None:
                on_result(index, results[index])
        except Exception as err:  # reported below, after the other runs
            errors[index] = err

    if processes == 1 or len(specs) <= 1:  # none left (a resumed grid): no pool to start
        for index, spec in enumerate(specs):
            done(index, lambda spec=spec: _in_process(spec, on_event))
    else:
        _in_pool(specs, processes, on_event, done)
    if errors:
        lines = [
            f"{specs[i].name} ({dict(specs[i].extra)}): {err!r}"
            for i, err in sorted(errors.items())
        ]
        first = errors[min(errors)]
        raise RunsFailed(
            f"{len(errors)} of {len(specs)} runs failed: " + "; ".join(lines)
        ) from first
    return [results[i] for i in range(len(specs))]


def _in_pool(
    specs: Sequence[RunSpec],
    processes: int,
    on_event: OnEvent | None,
    done: Callable[[int, Callable[[], dict[str, Any]]], None],
) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        events = manager.Queue()
        pump = _Pump(events, on_event)
        try:
            with ProcessPoolExecutor(min(processes, len(specs)), mp_context=context) as pool:
                futures = {pool.submit(run_spec, spec, events): i for i, spec in enumerate(specs)}
                for future in as_completed(futures):
                    done(futures[future], future.result)
        finally:
            pump.stop()


def _in_process(spec: RunSpec, on_event: OnEvent | None) -> dict[str, Any]:
    events: queue.Queue[Event] = queue.Queue()
    pump = _Pump(events, on_event)
    try:
        return run_spec(spec, events)
    finally:
        pump.stop()


class _Pump:
    """Hands queued events to ``on_event`` from a thread of this process."""

    def __init__(self, events: Any, on_event: OnEvent | None) -> None:
        self.events = events
        self.on_event = on_event
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self._drain(timeout=0.2)

    def _drain(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except (queue.Empty, EOFError, OSError):
            return
        if self.on_event is not None:
            self.on_event(event)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        while True:  # what arrived after the last poll
            try:
                event = self.events.get_nowait()
            except (queue.Empty, EOFError, OSError):
                return
            if self.on_event is not None:
                self.on_event(event)


def default_threads(processes: int) -> int | None:
    """Torch threads per run: the machine's cores shared among the processes."""
    import os

    if processes <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // processes)
