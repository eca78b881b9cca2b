"""The orchestrator every integration drives: schedule, pool, step decisions, hooks and state.

An integration does three things: call :meth:`RoClipDefense.start_epoch` at each epoch start,
compute each step's loss through the defense (:meth:`RoClipDefense.compute_loss`, or
:attr:`RoClipDefense.loss`, a drop-in for OpenCLIP's ``ClipLoss``), and save
:meth:`RoClipDefense.state_dict` with its checkpoint. Everything else (step counting, per-step
schedule decisions, pool updates, statistics to hooks) happens inside.

A step has one way through: the defense counts it and asks the schedule, its
:class:`~roclip_plugin.step.StepDecider` turns the embeddings and sample ids into a
:class:`~roclip_plugin.loss.StepPlan` (hooks hear of the lookup and the split), the loss
(:attr:`RoClipDefense.criterion`) computes from the features and the plan alone, and the
defense then records the alignment and has the decider update the pool. Nothing calls back
from the loss.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pluggy
import torch

from roclip_plugin.checks import no_matching_message, pool_share_message
from roclip_plugin.config import RoClipConfig
from roclip_plugin.config_aliases import renamed_keys
from roclip_plugin.contrastive import check_batch_sizes
from roclip_plugin.distributed import all_reduce_sum
from roclip_plugin.io import atomic_torch_save, read_state_file
from roclip_plugin.loss import DistInfo, RoClipLoss, StepPlan, check_action_supported
from roclip_plugin.plugins import BUILTINS_NAME, get_plugin_manager
from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk import DEFAULT_HISTORY_SLOTS, HistoryTable, make_engine, stable_ids
from roclip_plugin.schedule import ScheduleState, schedule_unit
from roclip_plugin.siglip import RoClipSigLipLoss
from roclip_plugin.step import StepContext, StepDecider, StepSettings
from roclip_plugin.validation import (
    LossInputCheck,
    check_count,
    check_defense_state,
    check_epoch,
    check_run_length,
)

STATE_VERSION = 1


class RoClipDefense:
    """RoCLIP for one training run (one per process under ``torch.distributed``).

    Args:
        config: settings; the ``default`` preset when omitted.
        plugin_manager: hooks; :func:`~roclip_plugin.plugins.get_plugin_manager` when omitted.
        options: the integration's parsed arguments, passed to ``roclip_configure``.
        device: where the pool lives; by default the device of the first features seen.
        dist_info: distributed set-up; read from ``torch.distributed`` when omitted.
        total_epochs: run length, needed by ``ramp`` schedules and ``warmup_fraction``.
        steps_per_epoch: needed with ``period_steps`` to know the run length in step blocks.
        samples_per_epoch: the training set's rows (all ranks), to warn about a pool that
            holds too large a share of them (see :meth:`check_run`), and the per-sample
            history's size where ``history_slots`` is 0. Give the dataset's length, not the
            batches' pairs: with ``drop_last`` those are fewer, and row-index ids past them
            would share the first rows' slots.
        siglip: train the sigmoid loss of SigLIP (OpenCLIP's ``--siglip``;
            ``dist_info.dist_impl`` is its ``--loss-dist-impl``) instead of CLIP's softmax loss.
        accum_freq: loss calls per optimiser step, as OpenCLIP's ``--accum-freq`` makes them
            (each on the whole accumulated batch): one step is counted, looked up and enqueued
            per ``accum_freq`` calls.
    """

    def __init__(
        self,
        config: RoClipConfig | None = None,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        options: argparse.Namespace | None = None,
        device: torch.device | str | None = None,
        dist_info: DistInfo | None = None,
        total_epochs: int | None = None,
        steps_per_epoch: int | None = None,
        samples_per_epoch: int | None = None,
        siglip: bool = False,
        accum_freq: int = 1,
    ) -> None:
        self.config = config or RoClipConfig()
        self.pm = plugin_manager or get_plugin_manager()
        self.info = dist_info or DistInfo.from_env()
        self.total_epochs, self.steps_per_epoch = check_run_length(total_epochs, steps_per_epoch)
        self.samples_per_epoch = check_count("samples_per_epoch", samples_per_epoch)
        self._run_checked = False
        self.pool = CaptionPool(self.config.pool_size, device=device)
        self.schedule = ScheduleState()
        self.epoch = 0
        self.step = 0  # steps started so far = index of the next step
        self.unit: int | None = None  # schedule unit in force
        self._acc_sum: torch.Tensor | None = None
        self._acc_count = 0
        matcher = self.pm.hook.roclip_make_matcher(config=self.config)
        self.risk = make_engine(self.risk_config(), self.pm, self.info.rank, self.info.world_size)
        loss_class = RoClipSigLipLoss if siglip else RoClipLoss
        check_action_supported(
            self.config.match_action,
            loss_class.weighted_objective,
            self.info.world_size,
            self.config.risky_negatives,
        )
        self.criterion: RoClipLoss = loss_class(self.info)
        self.decider = StepDecider(
            self.pool,
            matcher,
            self.info,
            self.step_settings(accum_freq, loss_class.gathers_matched),
            risk=self.risk,
            plugin_manager=self.pm,
        )
        self.check_inputs = LossInputCheck()
        self.loss = DefendedLoss(self)
        self._matching = False
        self._unimodal_only = False  # set at each epoch start (the unimodal warm-up)
        self._context = StepContext(matching=False)  # of the step in progress
        self._context_step = 0  # index of the step in progress (hooks and statistics)
        self._pending_ids: torch.Tensor | None = None  # ids of the next step's rows
        self.pm.hook.roclip_configure(config=self.config, options=options)

    def step_settings(self, accum_freq: int, gathers_matched: bool) -> StepSettings:
        """The config's part that decides each step (accumulation and the loss kind added)."""
        return StepSettings(
            update_pool_when_plain=self.config.pool_update == "every_step",
            match_fraction=self.config.match_fraction,
            match_action=self.config.match_action,
            duplicate_matches=self.config.duplicate_matches,
            accum_freq=accum_freq,
            risk_weight=self.config.risk_weight,
            risky_negatives=self.config.risky_negatives,
            gathers_matched=gathers_matched,
        )

    # -- what integrations call ---------------------------------------------------------

    @property
    def matching(self) -> bool:
        """Whether the current step is a matching one."""
        return self._matching

    @property
    def accum_freq(self) -> int:
        """Loss calls per optimiser step (OpenCLIP's ``--accum-freq``)."""
        return self.decider.settings.accum_freq

    @property
    def call_in_step(self) -> int:
        """Index of the next loss call within its optimiser step (0: a new step starts)."""
        return self.decider.call_in_step

    def risk_config(self) -> RoClipConfig:
        """The config the risk engine is built from: ``history_slots`` 0 resolved.

        0 means one slot per row where the trainer says how many (``samples_per_epoch``: row
        indices below it then never share a slot), else
        :data:`~roclip_plugin.risk.DEFAULT_HISTORY_SLOTS`.
        """
        if self.config.history_slots:
            return self.config
        slots = self.samples_per_epoch or DEFAULT_HISTORY_SLOTS
        return self.config.replace(history_slots=slots)

    def set_samples_per_epoch(self, samples: int | None) -> None:
        """Adopt the training set's row count when it was unknown at construction.

        With ``history_slots`` 0 the per-sample history gets one slot per row, as if the
        count had been given at construction, provided it holds no memory yet. A history
        already in use keeps its size (moving every id to another slot would scramble the
        memories), with a warning that says how to size it from the start.
        """
        self.samples_per_epoch = check_count("samples_per_epoch", samples)
        table = self._history_table()
        if table is None or self.config.history_slots:
            return
        slots = int(self.risk_config().history_slots)
        if slots == table.slots:
            return
        if table.visited():
            warnings.warn(
                f"samples_per_epoch {samples} came after training started: the per-sample "
                f"history keeps its {table.slots} slots, so rows beyond it share slots; pass "
                "samples_per_epoch when building the defense, or set --roclip-history-slots",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        table.resize(slots)

    def _history_table(self) -> HistoryTable | None:
        """The built-in per-sample history's table, where the risk score is ``history``."""
        scorer = None if self.risk is None else self.risk.scorer
        table = getattr(scorer, "table", None)
        return table if isinstance(table, HistoryTable) else None

    def set_sample_ids(self, ids: object) -> None:
        """Stable ids of the next step's rows (row indices, or string keys to hash).

        For trainers whose loss call cannot carry them (OpenCLIP calls the loss with the
        model's outputs only); a call of the loss with ``sample_ids=`` does the same.
        """
        self._pending_ids = stable_ids(ids)

    def observed(self) -> bool:
        """Whether any plugin implements ``roclip_after_match``.

        Asked at each matching step, so plugins registered after construction are served too.
        """
        return self.decider.observed()

    def set_step(self, step: int) -> None:
        """Adopt a trainer's global step count (index of the next step) on a fresh start."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: invalid value {step!r}; allowed: an integer >= 0")
        self.step = step

    @property
    def total_units(self) -> int | None:
        """Run length in schedule units, when known."""
        if self.config.period_steps == 0:
            return self.total_epochs
        if self.total_epochs is None or self.steps_per_epoch is None:
            return None
        return self.total_epochs * self.steps_per_epoch // self.config.period_steps

    def check_run(self) -> list[str]:
        """Warn about settings that leave the defense off or ineffective in this run.

        Where the run length is known: no matching epoch (or step block) inside the run; and,
        where ``samples_per_epoch`` is known, a pool holding more than
        :data:`~roclip_plugin.checks.POOL_SHARE_LIMIT` of an epoch's pairs. Each problem is a
        ``RuntimeWarning`` naming the flag to change; the messages are returned (integrations
        also log them). Called by the first :meth:`start_epoch`; a schedule a plugin supplies
        (``roclip_should_match``) is not second-guessed.
        """
        self._run_checked = True
        problems = [pool_share_message(self.config, self.samples_per_epoch)]
        if not self._custom_schedule():
            total = self.total_units
            problems.insert(0, no_matching_message(self.config, total, self.steps_per_epoch))
        messages = [p for p in problems if p is not None]
        for message in messages:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return messages

    def start_epoch(self, epoch: int) -> bool:
        """Begin epoch ``epoch`` (0-based); returns whether it starts as a matching epoch.

        With ``period_steps`` the answer is the decision of the block the epoch's first step
        falls in (which may begin exactly here), not the last block of the previous epoch.
        """
        epoch = check_epoch(epoch)
        if not self._run_checked:
            self.check_run()
        self._abandon_unfinished_step(epoch)
        self.epoch = epoch
        self._unimodal_only = epoch < self.config.unimodal_warmup_epochs
        unit = schedule_unit(epoch, self.step, self.config.period_steps)
        if self.config.period_steps == 0 or unit != self.unit:
            self._enter_unit(unit)
        self.pm.hook.roclip_epoch_start(epoch=epoch, matching=self.matching, defense=self)
        return self.matching

    def compute_loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        sample_ids: object = None,
    ) -> torch.Tensor:
        """The step's loss (a scalar tensor); same as calling :attr:`loss`.

        ``sample_ids``: stable ids of the rows (row indices or string keys), for the
        per-sample history (``--roclip-risk-score history``).
        """
        if sample_ids is not None:
            self.set_sample_ids(sample_ids)
        return self._loss_call(image_features, text_features, logit_scale, logit_bias)

    def plan_step(self, image_features: torch.Tensor, text_features: torch.Tensor) -> StepPlan:
        """The plan of this loss call; a step's first call counts the step and decides it.

        Half of a step for trainers that compute the loss themselves: call
        ``criterion.step_loss(..., plan)`` next, then :meth:`finish_call`.
        """
        if self.decider.call_in_step == 0:
            self._start_step()
            ids, self._pending_ids = self._pending_ids, None
            self._context = StepContext(
                self._matching, self._unimodal_only, self.epoch, self._context_step
            )
            return self.decider.plan(image_features, text_features, self._context, ids)
        return self.decider.plan(image_features, text_features, self._context)

    def finish_call(
        self,
        plan: StepPlan,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        accuracy: torch.Tensor,
    ) -> None:
        """After a loss call: the schedule's alignment signal; after a step's last, the pool.

        A plain step's accuracy feeds the alignment schedule; the decider then enqueues the
        step's captions and images once its last call is done.
        """
        if self.decider.call_in_step == 0 and plan.plain:
            self._record_alignment(accuracy)
        self.decider.finish(image_features, text_features)

    def _loss_call(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """One loss call: check, plan (the defense), compute (the loss), finish (the defense)."""
        self.check_inputs(image_features, text_features, logit_scale, matching=self._matching)
        check_batch_sizes(image_features, text_features, self.info)
        plan = self.plan_step(image_features, text_features)
        loss, accuracy = self.criterion.step_loss(
            image_features, text_features, logit_scale, logit_bias, plan
        )
        self.finish_call(plan, image_features, text_features, accuracy)
        return loss

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: pool, schedule, counters.

        Refused between the calls of an accumulated step: its lookup and its captions, not
        yet in the pool, would be lost. Save after the optimiser step.
        """
        if self.call_in_step:
            raise RuntimeError(
                f"RoClipDefense.state_dict: called after {self.call_in_step} of the "
                f"{self.accum_freq} loss calls of an accumulated step (accum_freq); save "
                "the state after the optimiser step"
            )
        pending = None if self._acc_sum is None else float(self._acc_sum)
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "pool": self.pool.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "unit": self.unit,
            "matching": self._matching,
            "alignment_pending": (pending, self._acc_count),
            "risk": None if self.risk is None else self.risk.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (on this defense's device)."""
        state = check_defense_state(state, STATE_VERSION)
        self.pool.load_state_dict(state["pool"])  # refuses a different pool size first
        self._warn_config_drift(renamed_keys(state["config"], what="saved RoCLIP setting"))
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.unit = state["unit"]
        self._matching = bool(state["matching"])
        pending, count = state["alignment_pending"]
        self._acc_sum = None if pending is None else torch.tensor(pending)
        self._acc_count = int(count)
        self._unimodal_only = self.epoch < self.config.unimodal_warmup_epochs
        if self.risk is not None and state.get("risk") is not None:
            self.risk.load_state_dict(state["risk"])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`state_dict` atomically (a crash mid-write leaves the old file intact)."""
        return atomic_torch_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore from a file written by :meth:`save`."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"RoCLIP state file {str(path)!r} does not exist")
        self.load_state_dict(read_state_file(path, "RoCLIP state file"))

    def _warn_config_drift(self, saved: Mapping[str, Any]) -> None:
        current = self.config.to_dict()
        drift = sorted(k for k in current if k in saved and saved[k] != current[k])
        if drift:
            details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in drift)
            warnings.warn(
                f"RoCLIP settings differ from the checkpoint's ({details}); the resumed run "
                "will not continue the saved schedule exactly",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- internals ------------------------------------------------------------------------

    def _abandon_unfinished_step(self, epoch: int) -> None:
        """An epoch starting inside an accumulated step: that step never reached the optimiser.

        OpenCLIP never leaves one (an epoch's trailing micro-batches that do not fill a step
        never reach the loss); a loop that breaks off mid-step gets a warning, and the step's
        captions stay out of the pool.
        """
        calls = self.decider.abandon()
        if calls:
            warnings.warn(
                f"RoCLIP: epoch {epoch} starts after {calls} of the {self.accum_freq} loss "
                "calls of an accumulated step (accum_freq); that step is discarded (its "
                "captions are not enqueued). Call the loss accum_freq times per optimiser step",
                RuntimeWarning,
                stacklevel=3,
            )

    def _custom_schedule(self) -> bool:
        impls = self.pm.hook.roclip_should_match.get_hookimpls()
        return any(impl.plugin_name != BUILTINS_NAME for impl in impls)

    def _enter_unit(self, unit: int) -> None:
        if self.unit is not None and unit != self.unit:
            self._flush_alignment(self.unit)
        self.unit = unit
        decision = self.pm.hook.roclip_should_match(
            epoch=self.epoch,
            step=self.step,
            unit=unit,
            total_units=self.total_units,
            config=self.config,
            state=self.schedule,
        )
        self._matching = bool(decision)

    def _start_step(self) -> None:
        """A step starts: count it, and enter its schedule unit (``period_steps``)."""
        self._context_step = self.step
        if self.config.period_steps:
            unit = schedule_unit(self.epoch, self.step, self.config.period_steps)
            if unit != self.unit:
                self._enter_unit(unit)
        self.step += 1

    def _record_alignment(self, accuracy: torch.Tensor) -> None:
        acc = accuracy.detach().float()
        self._acc_sum = acc if self._acc_sum is None else self._acc_sum.to(acc.device) + acc
        self._acc_count += 1

    def _flush_alignment(self, unit: int) -> None:
        """Record the finished unit's mean accuracy, averaged over ranks (same on every rank)."""
        total = torch.zeros(2, dtype=torch.float64)
        if self._acc_sum is not None:
            total = torch.stack(
                [
                    self._acc_sum.double().cpu(),
                    torch.tensor(float(self._acc_count), dtype=torch.float64),
                ]
            )
        if self.info.world_size > 1:
            total = all_reduce_sum(total)
        if total[1] > 0:
            self.schedule.record_alignment(unit, float(total[0] / total[1]))
        self._acc_sum, self._acc_count = None, 0


class DefendedLoss(torch.nn.Module):
    """The defense as a drop-in for OpenCLIP's ``ClipLoss`` (or ``SigLipLoss``).

    One module a trainer calls per loss call, which plans the step (the defense), computes the
    loss (the criterion) and finishes the call (the defense): the loss never calls back.

    ``forward`` takes and returns what ``ClipLoss.forward`` does. ``sample_ids`` (int64, one
    per row) key the per-sample history; a trainer that cannot pass them here sets
    :attr:`pending_ids` (or calls ``defense.set_sample_ids``) before the call.
    """

    def __init__(self, defense: RoClipDefense) -> None:
        super().__init__()
        self.defense = defense  # not a module: holds no parameters and is saved on its own

    @property
    def call_in_step(self) -> int:
        """Index of the next loss call within its optimiser step (0: a new step starts)."""
        return self.defense.call_in_step

    @property
    def accum_freq(self) -> int:
        """Loss calls per optimiser step."""
        return self.defense.accum_freq

    @property
    def pending_ids(self) -> torch.Tensor | None:
        """Ids of the next step's rows, taken by its first call."""
        return self.defense._pending_ids

    @pending_ids.setter
    def pending_ids(self, ids: torch.Tensor | None) -> None:
        self.defense._pending_ids = ids

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """One loss call; the step's first call decides, its last one updates the pool."""
        if sample_ids is not None:
            self.pending_ids = sample_ids
        loss = self.defense._loss_call(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss
