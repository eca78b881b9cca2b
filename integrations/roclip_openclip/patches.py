"""Run-time patches of OpenCLIP's training script: no fork, no copied code.

``open_clip_train.main`` imports ``parse_args``, ``create_loss``, ``train_one_epoch``,
``evaluate`` and ``get_data`` by name, so the patches replace those names in that module
(their home modules are untouched). ``get_dataset_fn`` is looked up at call time in
``open_clip_train.data``, so the training split's tokenizer and transform are wrapped there
with the augmentation policy, and ``CsvDataset.__getitem__`` passes the row index to it. A
WebDataset training pipeline is built with each sample's ``__key__`` and caption kept beside
the batch (:class:`KeyedBatches`), for the per-sample history and the suspicious-rows CSV.
Every patch is undone on exit. The OpenCLIP names patched are :mod:`roclip_openclip.openclip_api`'s,
the RoCLIP state files :mod:`roclip_openclip.state`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pluggy
import torch

from roclip_openclip import openclip_api as api
from roclip_openclip.state import (
    STATE_SUFFIX,
    StateKeeper,
    evaluates,
    state_candidates,
    state_path_for,
)
from roclip_openclip.usage import UsageError, check_model
from roclip_plugin import RoClipConfig, RoClipDefense
from roclip_plugin.augment import AugmentationPolicy, sample_index
from roclip_plugin.distributed import all_gather_objects, all_reduce_sum
from roclip_plugin.loss import DistInfo
from roclip_plugin.risk import stable_ids
from roclip_plugin.stats import (
    SUSPICIOUS_TOP,
    MatchStatsCollector,
    SuspiciousRow,
    suspicious_name,
    top_suspicious,
    write_suspicious,
)

log = logging.getLogger("roclip")
__all__ = ["STATE_SUFFIX", "OpenClipPatches", "state_path_for"]


class RecordingSampler:
    """Wraps a sampler and remembers the indices it hands out, in order.

    The DataLoader draws indices in the main process, in the order batches are later yielded
    (prefetching only draws earlier), so the k-th training step's samples are the next
    ``batch`` indices of the queue. That is how margins are tied to dataset rows.
    """

    def __init__(self, sampler: Any, queue: deque[int]) -> None:
        self.sampler = sampler
        self.queue = queue

    def __iter__(self) -> Iterator[int]:
        for index in self.sampler:
            self.queue.append(int(index))
            yield index

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:
        if name == "sampler":  # not set yet (copy, unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.sampler, name)


class _KeepCaption:
    """A pipeline stage: ``inner`` (OpenCLIP's ``map_dict``) after copying each raw caption.

    The caption is tokenized by ``inner``; the copy under ``__caption__`` is what the
    suspicious-rows CSV writes. A class, not a closure, so a spawned worker can pickle it.
    """

    def __init__(self, inner: Callable[[Iterator[dict]], Iterator[dict]]) -> None:
        self.inner = inner

    def __call__(self, source: Iterator[dict]) -> Iterator[dict]:
        return self.inner(self._copy(source))

    @staticmethod
    def _copy(source: Iterator[dict]) -> Iterator[dict]:
        for sample in source:
            text = sample.get("text")
            yield {**sample, "__caption__": text if isinstance(text, str) else ""}


class KeyedWebDataset:
    """``webdataset`` as OpenCLIP's training pipeline sees it, keeping key and caption.

    Only the two calls of the pipeline's tail differ: ``map_dict`` also keeps the raw caption
    and ``to_tuple`` adds ``__key__`` and the caption as two more columns, which
    :class:`KeyedBatches` takes off each batch in the main process. Everything else is the
    real module.
    """

    def __init__(self, wds: Any) -> None:
        self._wds = wds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wds, name)

    def map_dict(self, **functions: Any) -> Any:
        return _KeepCaption(self._wds.map_dict(**functions))

    def to_tuple(self, *fields: str) -> Any:
        return self._wds.to_tuple(*fields, "__key__", "__caption__")


class KeyedBatches:
    """A training loader whose batches carry keys and captions: yields them without, in order.

    The keys go to ``queue`` as ``(key, caption)`` when a batch reaches the training loop,
    which is the order steps consume them (as :class:`RecordingSampler` does for CSV rows).
    Attributes (``num_batches``, ``num_samples``) are the wrapped loader's.
    """

    def __init__(self, loader: Any, queue: deque[Any]) -> None:
        self.loader = loader
        self.queue = queue

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for images, texts, keys, captions in self.loader:
            self.queue.extend(zip(keys, captions, strict=True))
            yield images, texts

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (copy, unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.loader, name)


class EpochReport:
    """Ties each step's samples to dataset rows for the core's collector (:attr:`stats`).

    The statistics themselves (means, the suspicious count, the most suspicious rows) are
    :class:`roclip_plugin.stats.MatchStatsCollector`'s, registered beside this report; what is
    OpenCLIP's here is where a step's rows come from (the sampler's or the shards' queue).
    """

    def __init__(self, margin_threshold: float) -> None:
        self.stats = MatchStatsCollector(margin_threshold, keep=SUSPICIOUS_TOP)
        # CSV: dataset row indices; WebDataset: (__key__, caption) pairs
        self.indices: deque[Any] = deque()
        self.reset(matching=False)

    @property
    def steps(self) -> int:
        """Matching steps of this rank in the epoch."""
        return self.stats.steps

    def reset(self, matching: bool) -> None:
        """Forget the last epoch; called at each epoch start."""
        self.matching = matching
        self.stats.reset()
        self.indices.clear()
        self.step_rows: list[Any] = []

    def begin_step(self, batch: int) -> None:
        """Take the next ``batch`` sample indices: the rows of the step that starts now.

        Called before every loss call, plain or matching, so that each step's margins are tied
        to that step's own samples (taking them only on matching steps pinned every margin
        after a plain step to an earlier batch).
        """
        self.step_rows = [self.indices.popleft() if self.indices else -1 for _ in range(batch)]
        self.stats.payload = self.step_rows

    def step_ids(self) -> torch.Tensor | None:
        """The step's stable sample ids: CSV rows, or the hashes of WebDataset keys.

        None when any row of the step is unknown (the history then skips the step's rows).
        """
        rows = self.step_rows
        if rows and all(isinstance(r, tuple) for r in rows):
            return stable_ids([key for key, _ in rows])
        if rows and all(isinstance(r, int) and r >= 0 for r in rows):
            return torch.tensor(rows, dtype=torch.long)
        return None

    def before_loss(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the loss (OpenCLIP calls it with keywords).

        With ``--accum-freq N`` OpenCLIP calls the loss N times per step, each time on the
        whole accumulated batch (its micro-batches in loader order): the rows are taken on
        the step's first call only.
        """
        if getattr(module, "call_in_step", 0) != 0:
            return
        features = kwargs["image_features"] if "image_features" in kwargs else args[0]
        self.begin_step(int(features.shape[0]))
        ids = self.step_ids()
        if ids is not None and hasattr(module, "pending_ids"):
            module.pending_ids = ids  # the per-sample history is keyed by them

    def top_rows(self) -> list[SuspiciousRow]:
        """The rank's most suspicious rows: CSV row index, or WebDataset key and caption."""
        return self.stats.suspicious_rows(_describe_row)

    def summary(self) -> dict[str, float]:
        """Scalars for logs: means over matching steps of this rank."""
        stats = self.stats
        steps = max(stats.steps, 1)
        return {
            "matching": float(self.matching),
            "matched_similarity": stats.matched_sum / steps if stats.steps else math.nan,
            "own_similarity": stats.own_sum / steps if stats.steps else math.nan,
            "suspicious_pairs": float(stats.suspicious),
        }


def _describe_row(sample_id: int | None, row: Any) -> tuple[int, str, str]:
    """(row or -1, key, caption) of a step's row as :class:`EpochReport` queued it."""
    if isinstance(row, tuple):
        return -1, str(row[0]), str(row[1])
    return (int(row) if row is not None else -1), "", ""


class OpenClipPatches:
    """Installs RoCLIP into ``open_clip_train.main`` for the duration of a ``with`` block."""

    def __init__(
        self,
        config: RoClipConfig,
        plugin_manager: pluggy.PluginManager,
        options: argparse.Namespace,
        *,
        suspicious_margin: float,
        policy: AugmentationPolicy | None = None,
    ) -> None:
        self.config = config
        self.pm = plugin_manager
        self.options = options
        self.report = EpochReport(suspicious_margin)
        self.pm.register(self.report.stats, name="roclip-openclip-report")
        self.policy = policy
        self.defense: RoClipDefense | None = None
        self.data: dict[str, Any] | None = None
        self.captions: list[str] | None = None
        self._stack = contextlib.ExitStack()
        self.state = StateKeeper()
        self._args: Any = None  # OpenCLIP's parsed arguments, known from the first epoch

    # -- context --------------------------------------------------------------------------

    def __enter__(self) -> OpenClipPatches:
        self._wrap(api.PARSE_ARGS, self._parse_args)
        self._wrap(api.GET_DATA, self._get_data)
        self._replace(api.CREATE_LOSS, self._create_loss)
        self._wrap(api.TRAIN_ONE_EPOCH, self._train_one_epoch)
        self._wrap(api.EVALUATE, self._evaluate)
        self._wrap(api.GET_DATASET_FN, self._get_dataset_fn)
        if self.policy is not None:
            self._wrap(api.CSV_GETITEM, _indexed_getitem)
        self._patch(torch.nn.parallel, "DistributedDataParallel", _ddp_without_cpu_device_ids())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if exc[0] is None and self._args is not None and self.defense is not None:
            self.state.flush(self.defense, self._args)  # only if evaluate was expected, not run
            if self.state.completed is not None:
                self.state.checkpoint_written(self.state.completed, self._args)

    def _patch(self, module: Any, name: str, value: Any) -> None:
        original = getattr(module, name)
        setattr(module, name, value)
        self._stack.callback(setattr, module, name, original)

    def _replace(self, target: api.OpenClipName, value: Any) -> None:
        """OpenCLIP's ``target`` is ``value`` until the block ends."""
        self._stack.enter_context(target.replaced(value))

    def _wrap(self, target: api.OpenClipName, wrapper: Callable[[Any], Any]) -> None:
        """OpenCLIP's ``target`` is ``wrapper(original)`` until the block ends."""
        self._replace(target, wrapper(target.get()))

    # -- patched functions --------------------------------------------------------------

    def _parse_args(self, original: Callable[..., argparse.Namespace]) -> Callable[..., Any]:
        def parse_args(argv: list[str]) -> argparse.Namespace:
            args = original(argv)
            args.roclip = True
            for name, value in self.config.to_dict().items():
                setattr(args, f"roclip_{name}", value)  # so params.txt records them
            return args

        return parse_args

    def _get_dataset_fn(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def get_dataset_fn(data_path: str, dataset_type: str) -> Callable[..., Any]:
            build = original(data_path, dataset_type)

            def build_with_roclip(args: Any, preprocess_fn: Any, is_train: bool, **kw: Any) -> Any:
                if is_train and self.policy is not None:
                    preprocess_fn = self.policy.image_transform(preprocess_fn)
                    if kw.get("tokenizer") is not None:
                        kw["tokenizer"] = self.policy.tokenizer(kw["tokenizer"])
                return build(args, preprocess_fn, is_train=is_train, **kw)

            if is_webdataset(build):
                return self._keyed_webdataset(build_with_roclip)
            return build_with_roclip

        return get_dataset_fn

    def _keyed_webdataset(self, build: Callable[..., Any]) -> Callable[..., Any]:
        """The WebDataset builder whose training loader also hands each sample's key over."""

        def build_keyed(args: Any, preprocess_fn: Any, is_train: bool, **kw: Any) -> Any:
            if not is_train:
                return build(args, preprocess_fn, is_train=is_train, **kw)
            with api.WDS.replaced(KeyedWebDataset(api.WDS.get())):
                info = build(args, preprocess_fn, is_train=is_train, **kw)
            info.dataloader = KeyedBatches(info.dataloader, self.report.indices)
            return info

        return build_keyed

    def _get_data(self, original: Callable[..., dict[str, Any]]) -> Callable[..., Any]:
        def get_data(args: Any, *a: Any, **kw: Any) -> dict[str, Any]:
            data = original(args, *a, **kw)
            self.data = data
            if "train" in data:
                self._tap_indices(data["train"].dataloader)
            return data

        return get_data

    def _tap_indices(self, loader: Any) -> None:
        """Record sample indices of a map-style training set (CSV); WebDataset has none."""
        dataset = getattr(loader, "dataset", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None or not hasattr(dataset, "__getitem__"):
            return
        batch_sampler.sampler = RecordingSampler(batch_sampler.sampler, self.report.indices)
        self.captions = list(getattr(dataset, "captions", [])) or None

    def _create_loss(self, args: Any) -> torch.nn.Module:
        steps = samples = None
        if self.data is not None and "train" in self.data:
            loader = self.data["train"].dataloader
            steps = loader.num_batches // args.accum_freq
            samples = getattr(loader, "num_samples", None)
        info = DistInfo(
            rank=args.rank,
            world_size=args.world_size,
            local_loss=args.local_loss,
            gather_with_grad=args.gather_with_grad,
            dist_impl=getattr(args, "loss_dist_impl", None),
        )
        self.defense = RoClipDefense(
            self.config,
            plugin_manager=self.pm,
            options=self.options,
            device=args.device,
            dist_info=info,
            total_epochs=args.epochs,
            steps_per_epoch=steps,
            samples_per_epoch=samples,
            siglip=bool(getattr(args, "siglip", False)),
            accum_freq=args.accum_freq,
        )
        self.defense.loss.register_forward_pre_hook(self.report.before_loss, with_kwargs=True)
        for message in self.defense.check_run():  # also a RuntimeWarning
            if args.rank == 0:
                log.warning(message)
        return self.defense.loss

    def _resume(self, epoch: int, args: Any) -> None:
        """Restore the state of the checkpoint being resumed (OpenCLIP's start epoch ``epoch``)."""
        assert self.defense is not None
        try:
            location = self.state.restore(self.defense, args, epoch)
        except ValueError as err:  # also a StateError: unreadable, incomplete, other pool size
            raise UsageError(f"--resume {args.resume}: {err}") from None
        if location is None:
            where = " or ".join(state_candidates(str(args.resume), epoch))
            log.warning(
                f"RoCLIP: no RoCLIP state at {where} next to the resumed checkpoint; starting "
                "with an empty caption pool (expected only when the checkpoint was trained "
                "without --roclip)"
            )
            return
        log.info(
            f"RoCLIP: restored pool ({len(self.defense.pool)} rows), schedule and RNG state "
            f"of epoch {epoch} from {location}"
        )

    def _train_one_epoch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def train_one_epoch(
            model: Any, data: Any, loss: Any, epoch: int, *a: Any, **kw: Any
        ) -> Any:
            args = a[-1] if a else kw["args"]
            assert self.defense is not None, "create_loss was not called before training"
            self._start(model, epoch, args)
            if self.policy is not None:
                self.policy.set_epoch(epoch)  # before the loader's workers start
            matching = self.defense.start_epoch(epoch)
            self.report.reset(matching)
            result = original(model, data, loss, epoch, *a, **kw)
            self._after_epoch(epoch, args, kw.get("tb_writer"))
            later = evaluates(self.data)  # then the state waits for the evaluation's RNG draws
            self.state.epoch_done(epoch + 1, self.defense, args, later=later)
            return result

        return train_one_epoch

    def _start(self, model: Any, epoch: int, args: Any) -> None:
        """Before an epoch: on the first, check the model and resume.

        Before any later epoch, the previous epoch's checkpoint exists.
        """
        assert self.defense is not None
        if self._args is None:
            check_model(model, args)
            self._args = args
            if args.resume:
                self._resume(epoch, args)
            return
        self.state.flush(self.defense, args)  # evaluate was expected but did not run
        self.state.checkpoint_written(epoch, args)

    def _evaluate(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def evaluate(model: Any, data: Any, epoch: int, args: Any, *a: Any, **kw: Any) -> Any:
            result = original(model, data, epoch, args, *a, **kw)
            if self.defense is not None:
                self.state.flush(self.defense, args)  # the RNG the next epoch starts from
            return result

        return evaluate

    # -- after each epoch ----------------------------------------------------------------

    def _after_epoch(self, epoch: int, args: Any, tb_writer: Any) -> None:
        assert self.defense is not None
        summary = self.report.summary()
        summary["pool_fill"] = float(len(self.defense.pool))
        rows = top_suspicious(all_gather_objects(self.report.top_rows()), SUSPICIOUS_TOP)
        suspicious = torch.tensor([summary["suspicious_pairs"]], dtype=torch.float64)
        summary["suspicious_pairs"] = float(all_reduce_sum(suspicious)[0])
        log.info(
            "RoCLIP epoch %d rank %d: matching=%s pool=%d/%d checksum=%.10g matched_sim=%.4f "
            "own_sim=%.4f suspicious_pairs=%d",
            epoch,
            args.rank,
            bool(summary["matching"]),
            int(summary["pool_fill"]),
            self.defense.pool.size,
            self.defense.pool.checksum(),
            summary["matched_similarity"],
            summary["own_similarity"],
            int(summary["suspicious_pairs"]),
        )
        if not args.save_logs:
            return
        self._write_scalars(summary, epoch, args, tb_writer)
        if self.report.matching or self.report.steps:  # blocks may switch inside an epoch
            self._write_suspicious(rows, epoch, args)

    def _write_scalars(
        self, summary: dict[str, float], epoch: int, args: Any, tb_writer: Any
    ) -> None:
        step = self.defense.step if self.defense is not None else epoch
        if tb_writer is not None:
            for key, value in summary.items():
                tb_writer.add_scalar(f"roclip/{key}", value, step)
            # OpenCLIP never closes its writer: without a flush the last epoch could stay buffered
            tb_writer.flush()
        if getattr(args, "wandb", False):
            import wandb

            wandb.log({f"roclip/{k}": v for k, v in summary.items()} | {"epoch": epoch}, step=step)

    def _write_suspicious(self, rows: list[SuspiciousRow], epoch: int, args: Any) -> None:
        """The epoch's most suspicious rows, a CSV row's caption read from the dataset."""
        if self.captions:
            captions = self.captions
            rows = [
                replace(r, caption=captions[r.index]) if not r.caption and r.index >= 0 else r
                for r in rows
            ]
        write_suspicious(Path(args.checkpoint_path) / suspicious_name(epoch + 1), rows)


def is_webdataset(build: Callable[..., Any]) -> bool:
    """Whether ``build`` (from OpenCLIP's ``get_dataset_fn``) is its WebDataset builder."""
    return getattr(build, "__name__", "") == api.GET_WDS_DATASET.name


def _indexed_getitem(original: Callable[[Any, int], Any]) -> Callable[[Any, int], Any]:
    """``CsvDataset.__getitem__`` that tells the augmentations which row they transform.

    OpenCLIP's CSV dataset calls ``transforms(image)`` and ``tokenize([caption])`` without the
    row index; with it, a row's augmentation depends only on (seed, epoch, row), whatever the
    number of workers or ranks. Patched on the class so forked workers inherit it.
    """

    def __getitem__(self: Any, idx: int) -> Any:
        with sample_index(int(idx)):
            return original(self, idx)

    return __getitem__


def _ddp_without_cpu_device_ids() -> type:
    """DDP that drops ``device_ids`` for a CPU module (stock OpenCLIP passes them; gloo fails).

    A subclass, not a function, so ``isinstance`` checks against DDP keep working.
    """
    real = torch.nn.parallel.DistributedDataParallel

    class CpuFriendlyDDP(real):  # type: ignore[misc, valid-type]
        def __init__(
            self, module: torch.nn.Module, *args: Any, device_ids: Any = None, **kw: Any
        ) -> None:
            first = next(module.parameters(), None)
            if first is not None and first.device.type == "cpu":
                device_ids = None
            super().__init__(module, *args, device_ids=device_ids, **kw)

    return CpuFriendlyDDP
