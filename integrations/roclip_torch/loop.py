"""A minimal, readable CLIP training loop with RoCLIP, for projects that have no loop yet.

It is driven by the same :class:`~roclip_torch.adapter.RoClipAdapter` an in-house loop would
use, and adds what every run needs: a seeded, epoch-based data order; optional bf16 autocast;
gradient clipping; CLIP's logit-scale clamp; an atomic checkpoint after every epoch; an exact
resume from the newest checkpoint (model, optimiser, scheduler, RNG states, data order, RoCLIP
state); rich progress bars and a per-epoch table of the loss and the matching statistics.

Data: a map-style dataset of ``(images, texts)`` pairs, where each element is whatever the
model accepts (tensors, or lists/dicts of tensors, moved to the device as they are).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pluggy
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress, TaskID
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from roclip_plugin import RoClipConfig
from roclip_plugin.distributed import (
    all_gather_objects,
    all_reduce_sum,
    rank_and_world_size,
    rng_state,
    set_rng_state,
)
from roclip_plugin.io import atomic_torch_save, check_output_dir, load_versioned
from roclip_torch.adapter import CLIP_MAX_LOGIT_SCALE, RoClipAdapter
from roclip_torch.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    prune_checkpoints,
)
from roclip_torch.features import is_data_parallel, model_device, unwrap
from roclip_torch.report import make_progress, summary_table
from roclip_torch.summary import EpochSummary

CHECKPOINT_FORMAT = "roclip_torch.loop/1"


@dataclass(frozen=True)
class TrainSettings:
    """How :class:`Trainer` runs; validated at construction.

    Attributes:
        epochs: total epochs of the run (also the schedule's run length).
        batch_size: images per step *per process*.
        checkpoint_dir: where ``epoch_<N>.pt`` files go; None saves nothing.
        resume: continue from the newest checkpoint in ``checkpoint_dir`` when there is one.
        seed: seed of the data order (epoch ``e`` is shuffled with ``seed + e``, so the order
            depends only on the epoch, not on how the run was interrupted).
        amp: bf16 autocast for the forward pass (CPU or CUDA); no gradient scaler is needed.
        grad_clip_norm: clip the global gradient norm to this value; None does not clip.
        max_logit_scale: clamp ``exp(logit_scale)`` to at most this after every step (CLIP's
            100, i.e. ``ln 100`` on the stored parameter); None does not clamp.
        num_workers: DataLoader worker processes.
        drop_last: drop the last incomplete batch. Needed under DDP: the caption pool gathers
            equally sized batches from every rank.
        keep_last: keep only this many newest checkpoints; None keeps all.
        progress: show rich progress bars and tables (rank 0 only).
        log_every: read the loss (a GPU synchronisation) every this many steps.
    """

    epochs: int
    batch_size: int
    checkpoint_dir: str | Path | None = None
    resume: bool = True
    seed: int = 0
    amp: bool = False
    grad_clip_norm: float | None = None
    max_logit_scale: float | None = CLIP_MAX_LOGIT_SCALE
    num_workers: int = 0
    drop_last: bool = True
    keep_last: int | None = None
    progress: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            _require(name, getattr(self, name), getattr(self, name) >= 1, "an integer >= 1")
        _require("num_workers", self.num_workers, self.num_workers >= 0, "an integer >= 0")
        _require("seed", self.seed, self.seed >= 0, "an integer >= 0")
        if self.keep_last is not None:
            _require("keep_last", self.keep_last, self.keep_last >= 1, "None or >= 1")
        if self.grad_clip_norm is not None:
            _require("grad_clip_norm", self.grad_clip_norm, self.grad_clip_norm > 0, "None or > 0")
        if self.max_logit_scale is not None:
            ok = self.max_logit_scale >= 1
            _require("max_logit_scale", self.max_logit_scale, ok, "None or >= 1")


def _require(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"TrainSettings.{name}: invalid value {value!r}; allowed: {allowed}")


class Trainer:
    """Trains a CLIP-style model with RoCLIP; see docs/torch-loop.md.

    Under ``torch.distributed`` (initialise the process group first, one process per device)
    the model is wrapped in ``DistributedDataParallel`` unless it already is, each rank reads
    its shard of the data, rank 0 writes checkpoints and prints, and the caption pool is
    identical on every rank.

    Args:
        model: the model; its ``forward(images, texts)`` or ``encode_image``/``encode_text``
            gives features (see :class:`RoClipAdapter`), its ``logit_scale`` the temperature.
        optimizer: the optimiser over the model's parameters.
        dataset: map-style dataset of ``(images, texts)`` pairs.
        settings: the run's settings.
        roclip: a :class:`RoClipConfig` (the adapter is built here), a ready
            :class:`RoClipAdapter`, or None for the default configuration.
        scheduler: a learning-rate scheduler, stepped once per optimiser step.
        plugin_manager: hooks for an adapter built here.
        collate_fn: the DataLoader's collate function.
        device: where to train; by default the model's device.
        console: rich console for progress and tables (default: standard output).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset[Any],
        settings: TrainSettings,
        *,
        roclip: RoClipConfig | RoClipAdapter | None = None,
        scheduler: Any = None,
        plugin_manager: pluggy.PluginManager | None = None,
        collate_fn: Any = None,
        device: torch.device | str | None = None,
        console: Console | None = None,
    ) -> None:
        self.settings = settings
        if settings.checkpoint_dir is not None:  # not after an epoch, at the first save
            check_output_dir(settings.checkpoint_dir, "TrainSettings.checkpoint_dir")
        self.module = unwrap(model)
        self.device = torch.device(device) if device else model_device(model) or torch.device("cpu")
        model.to(self.device)  # in place: the optimiser keeps the same parameters
        self.rank, self.world_size = rank_and_world_size()
        if self.world_size > 1 and not settings.drop_last:
            raise ValueError(
                "Trainer: drop_last=False under torch.distributed; the caption pool gathers "
                "equally sized batches from every rank, so the last incomplete batch must go"
            )
        self.model = self._wrap_ddp(model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sampler = DistributedSampler(
            dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=settings.seed,
            drop_last=settings.drop_last,
        )
        self.loader = DataLoader(
            dataset,
            batch_size=settings.batch_size,
            sampler=self.sampler,
            drop_last=settings.drop_last,
            num_workers=settings.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"Trainer: {len(dataset)} samples give no full batch of {settings.batch_size} "
                f"per rank on {self.world_size} rank(s); lower batch_size"
            )
        self.adapter = self._make_adapter(roclip, plugin_manager)
        self.console = console or Console()
        self.show = settings.progress and self.rank == 0
        self.history: list[EpochSummary] = []
        self.next_epoch = 0

    # -- the run ---------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> list[EpochSummary]:
        """Train until ``settings.epochs`` (resuming first when asked); returns every summary.

        Args:
            stop_after: stop once this many epochs are complete (a time-boxed job); running
                ``fit`` again, in this or a new process, continues exactly.
        """
        if self.settings.resume and self.settings.checkpoint_dir is not None:
            self.resume()
        end = self.settings.epochs if stop_after is None else min(stop_after, self.settings.epochs)
        with make_progress(self.console, disable=not self.show) as progress:
            run = progress.add_task(
                "run", total=self.settings.epochs, completed=self.next_epoch, info=""
            )
            for epoch in range(self.next_epoch, end):
                summary = self.train_epoch(epoch, progress)
                self.history.append(summary)
                self.next_epoch = epoch + 1
                self.save_checkpoint()
                progress.update(run, advance=1, info=f"loss {summary.loss:.4f}")
                if self.show:
                    progress.console.print(summary_table([summary], f"RoCLIP epoch {epoch}"))
        if self.show and self.next_epoch == self.settings.epochs:
            self.console.print(summary_table(self.history, "RoCLIP run"))
        return list(self.history)

    def train_epoch(self, epoch: int, progress: Progress) -> EpochSummary:
        """One pass over this rank's shard of the data."""
        self.model.train()
        self.sampler.set_epoch(epoch)
        matching = self.adapter.epoch_start(epoch)
        task = progress.add_task(f"epoch {epoch}", total=len(self.loader), info="")
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = 0
        ids = self.epoch_sample_ids()
        size = self.settings.batch_size
        for images, texts in self.loader:
            loss = self.train_step(images, texts, ids[steps * size : (steps + 1) * size])
            loss_sum += loss.detach().double()
            steps += 1
            self._show_step(progress, task, loss, epoch, steps)
        progress.remove_task(task)
        return self._summarize(epoch, matching, loss_sum, steps)

    def epoch_sample_ids(self) -> torch.Tensor:
        """The dataset indices of this rank's epoch, in the order its batches come.

        The sampler is seeded by epoch, so listing it again gives the order the loader draws,
        and the loader keeps that order whatever its workers: batch ``b`` holds entries
        ``b * batch_size`` onwards. They are the per-sample history's ids (the ``robust``
        preset): the same sample keeps its id on every rank, epoch and resume.
        """
        return torch.tensor(list(iter(self.sampler)), dtype=torch.int64)

    def train_step(
        self, images: Any, texts: Any, sample_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward, RoCLIP loss, backward, clip, optimiser and scheduler step, clamp."""
        images, texts = _to_device(images, self.device), _to_device(texts, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.amp):
            loss = self.adapter.step(images, texts, sample_ids=sample_ids)
        loss.backward()
        if self.settings.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.settings.max_logit_scale is not None:
            self.adapter.clamp_logit_scale(self.settings.max_logit_scale)
        return loss

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write ``epoch_<completed>.pt`` atomically (rank 0); every rank must call it."""
        if self.settings.checkpoint_dir is None:
            return None
        rngs = all_gather_objects(rng_state())
        path = checkpoint_path(self.settings.checkpoint_dir, self.next_epoch)
        if self.rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT,
                "completed_epochs": self.next_epoch,
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "rng": rngs,
                "history": [s.to_dict() for s in self.history],
                "settings": {k: _plain(v) for k, v in asdict(self.settings).items()},
            }
            atomic_torch_save(self.adapter.put_in_checkpoint(state), path)
            if self.settings.keep_last is not None:
                prune_checkpoints(self.settings.checkpoint_dir, self.settings.keep_last)
        if self.world_size > 1:
            dist.barrier()  # nobody resumes from, or prunes, a file still being written
        return path

    def resume(self) -> Path | None:
        """Restore the newest checkpoint of ``checkpoint_dir``; returns it, or None if none."""
        assert self.settings.checkpoint_dir is not None
        path = latest_checkpoint(self.settings.checkpoint_dir)
        if path is None:
            return None
        state = load_versioned(path, CHECKPOINT_FORMAT, "roclip_torch checkpoint")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_scheduler(state["scheduler"], path)
        self.adapter.load_from_checkpoint(state)
        self.history = [EpochSummary.from_dict(d) for d in state["history"]]
        self.next_epoch = int(state["completed_epochs"])
        self._restore_rng(state["rng"], path)
        if self.show:
            self.console.print(f"resumed from {path} after {self.next_epoch} epoch(s)")
        return path

    # -- internals ---------------------------------------------------------------------------

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1 or is_data_parallel(model):
            return model
        # gloo on CPU refuses device_ids; CUDA needs the one device this process drives.
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _dataset_rows(self, steps: int) -> int:
        """The rows the sample ids index: the dataset's length where it has one.

        Not the batches' pairs: with ``drop_last`` those are fewer than the rows, and the
        per-sample history, sized by them, would give the tail's ids the head's slots.
        """
        try:
            return len(self.loader.dataset)  # type: ignore[arg-type]
        except TypeError:  # an iterable dataset without a length
            return steps * self.settings.batch_size * self.world_size

    def _make_adapter(
        self, roclip: RoClipConfig | RoClipAdapter | None, pm: pluggy.PluginManager | None
    ) -> RoClipAdapter:
        steps = len(self.loader)
        samples = self._dataset_rows(steps)
        if not isinstance(roclip, RoClipAdapter):
            return RoClipAdapter(
                roclip,
                model=self.model,
                total_epochs=self.settings.epochs,
                steps_per_epoch=steps,
                samples_per_epoch=samples,
                plugin_manager=pm,
                device=self.device,
            )
        if pm is not None:
            raise ValueError("Trainer: pass plugin_manager to the RoClipAdapter, not both")
        if roclip.stats is None:
            raise ValueError("Trainer: the adapter must collect statistics (collect_stats=True)")
        if roclip.encode_image is None and (
            roclip.model is None or unwrap(roclip.model) is self.module
        ):
            roclip.model = self.model  # the DDP wrapper, so gradients are synchronised
        if roclip.defense.total_epochs is None:
            roclip.set_run_length(self.settings.epochs, steps, samples)
        return roclip

    def _show_step(
        self, progress: Progress, task: TaskID, loss: torch.Tensor, epoch: int, step: int
    ) -> None:
        if step % self.settings.log_every and step != len(self.loader):
            progress.advance(task)
            return
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"loss is {value} at epoch {epoch} step {step}: lower the learning rate, enable "
                "grad_clip_norm, or check the data"
            )
        progress.update(task, advance=1, info=f"loss {value:.4f}")

    def _summarize(
        self, epoch: int, matching: bool, loss_sum: torch.Tensor, steps: int
    ) -> EpochSummary:
        totals = torch.stack([loss_sum.cpu(), torch.tensor(float(steps), dtype=torch.float64)])
        if self.world_size > 1:
            totals = all_reduce_sum(totals)
        match = self.adapter.match_summary()
        return EpochSummary(
            epoch=epoch,
            steps=steps,
            loss=float(totals[0] / totals[1]),
            matching=matching,
            matching_steps=match.matching_steps,
            pool_fill=len(self.adapter.pool),
            pool_size=self.adapter.pool.size,
            matched_similarity=match.matched_similarity,
            own_similarity=match.own_similarity,
            suspicious=match.suspicious,
            lr=float(self.optimizer.param_groups[0]["lr"]),
        )

    def _load_scheduler(self, saved: dict[str, Any] | None, path: Path) -> None:
        if (saved is None) != (self.scheduler is None):
            raise ValueError(
                f"{path}: the checkpoint was written {'without' if saved is None else 'with'} a "
                "learning-rate scheduler but this run has "
                f"{'one' if self.scheduler is not None else 'none'}; resume with the same set-up"
            )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved)

    def _restore_rng(self, rngs: list[dict[str, Any]], path: Path) -> None:
        if len(rngs) != self.world_size:
            # Data order stays exact (it depends on the epoch only); dropout and augmentation
            # draws cannot, since the ranks no longer correspond.
            self.console.print(
                f"[yellow]{path}: saved with {len(rngs)} rank(s), resumed on "
                f"{self.world_size}; random states are not restored[/yellow]"
            )
            return
        set_rng_state(rngs[self.rank])


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside lists, tuples and dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
