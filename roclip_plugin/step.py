"""The defense's decision for each optimiser step: plain, matched, or the risk split's action.

A training step has one way through. The defense counts the step and asks its schedule
(:class:`~roclip_plugin.defense.RoClipDefense`); :class:`StepDecider` takes the step's
embeddings and sample ids and decides: it looks up each image's nearest pool caption, asks the
risk engine to split the batch, and returns a :class:`~roclip_plugin.loss.StepPlan` of plain
tensors. The loss computes from the features and that plan and knows nothing of this room;
after each loss call the decider is told the call is done, and after a step's last call it
enqueues the step's captions and images. Statistics go to the plugin hooks from here, never
from the loss.

OpenCLIP's gradient accumulation (``--accum-freq N``) calls the loss N times per optimiser step
on the same accumulated batch; with ``accum_freq=N`` the first call of a step takes every
decision (lookup, split, statistics) and the last one enqueues, so the step behaves as one
large batch. The batch's own captions are enqueued after the lookup (gathered in rank order,
so the pool is identical on every rank) and never match their own images.
"""

from __future__ import annotations

from dataclasses import dataclass

import pluggy
import torch
import torch.nn.functional as F

from roclip_plugin.config import DUPLICATE_MATCHES, RISKY_NEGATIVES
from roclip_plugin.contrastive import (
    DistInfo,
    MatchStats,
    RiskStats,
    caption_ids,
    gather_features,
)
from roclip_plugin.loss import PLAIN, StepPlan
from roclip_plugin.matching import (
    Matcher,
    autocast_disabled,
    check_finite_queries,
    highest_matmul_precision,
)
from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk import MarginScorer, RiskDecision, RiskEngine, RiskSettings


def check_accum_freq(accum_freq: int) -> None:
    """Refuse an ``accum_freq`` that is not a positive integer, naming the flag."""
    if isinstance(accum_freq, bool) or not isinstance(accum_freq, int) or accum_freq < 1:
        raise ValueError(
            f"accum_freq (OpenCLIP's --accum-freq): invalid value {accum_freq!r}; allowed: an "
            "integer >= 1 (loss calls per optimiser step)"
        )


@dataclass(frozen=True)
class StepSettings:
    """How steps are decided (see ``RoClipConfig`` for the fields that share a name).

    Attributes:
        update_pool_when_plain: enqueue captions on plain steps too (the default policy).
        match_fraction: the share of each defended step's images that get ``match_action``
            (1.0, the paper: every image is re-paired with its nearest pool caption).
        match_action: ``match``, ``drop``, ``weight`` or ``unimodal``.
        duplicate_matches: ``mask`` makes a pool caption matched by several images the
            positive of each of them and a negative of none; ``keep`` (the authors' code)
            leaves the copies as negatives of the other images.
        accum_freq: loss calls per optimiser step (OpenCLIP's ``--accum-freq``).
        risk_weight: ``match_action="weight"``: the weight of a risky pair's terms.
        risky_negatives: ``drop`` and ``unimodal``: ``out`` takes a risky pair out of the
            batch, ``keep`` leaves its image and caption negatives of the other pairs.
        gathers_matched: the loss takes every rank's matched rows gathered once per step
            (the softmax loss; SigLIP passes blocks around instead).
    """

    update_pool_when_plain: bool = True
    match_fraction: float = 1.0
    match_action: str = "match"
    duplicate_matches: str = "keep"
    accum_freq: int = 1
    risk_weight: float = 0.1
    risky_negatives: str = "out"
    gathers_matched: bool = True

    def __post_init__(self) -> None:
        check_accum_freq(self.accum_freq)
        # built directly (not from a RoClipConfig), a misspelt choice would act as the default
        for name, allowed in (
            ("duplicate_matches", DUPLICATE_MATCHES),
            ("risky_negatives", RISKY_NEGATIVES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                flag = "--roclip-" + name.replace("_", "-")
                raise ValueError(
                    f"{name} ({flag}): invalid value {value!r}; allowed: {', '.join(allowed)}"
                )


@dataclass(frozen=True)
class StepContext:
    """What the defense's schedule says about the step being decided.

    Attributes:
        matching: whether the step falls in a matching (defended) unit.
        unimodal_only: the unimodal warm-up: no cross-modal term at all.
        epoch: 0-based epoch.
        step: global step counted by the defense (0-based).
    """

    matching: bool
    unimodal_only: bool = False
    epoch: int = 0
    step: int = 0


@dataclass(frozen=True)
class _RunningStep:
    """The decision of the step in progress, reused by each of its loss calls."""

    plan: StepPlan
    rows: int
    enqueue: bool
    context: StepContext


class StepDecider:
    """Decides each optimiser step and keeps the pool and the banks after it (one per process).

    Args:
        pool: the caption pool.
        matcher: maps (local image features, pool) to logical pool indices.
        info: distributed set-up.
        settings: how steps are decided.
        risk: the risk engine that judges each pair of a defended step; None for the paper's
            full matching (a partial ``match_fraction`` or another ``match_action`` then
            judges by the margin).
        plugin_manager: whose ``roclip_after_match``, ``roclip_after_risk`` and
            ``roclip_pool_updated`` hooks hear of each step; None: no hooks.
    """

    def __init__(
        self,
        pool: CaptionPool,
        matcher: Matcher,
        info: DistInfo | None = None,
        settings: StepSettings | None = None,
        *,
        risk: RiskEngine | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        self.pool = pool
        self.matcher = matcher
        self.info = info or DistInfo.from_env()
        self.settings = settings or StepSettings()
        self.pm = plugin_manager
        if risk is None and (self.settings.match_fraction < 1.0 or self._action != "match"):
            share, action = self.settings.match_fraction, self._action
            engine = RiskSettings(share=share, action=action, image_bank_size=0)
            risk = RiskEngine(MarginScorer(), engine, self.info.rank, self.info.world_size)
        self.risk = risk
        self._call = 0  # index of the next call within the current optimiser step
        self._running: _RunningStep | None = None

    @property
    def _action(self) -> str:
        return self.settings.match_action

    @property
    def call_in_step(self) -> int:
        """Index of the next loss call within its optimiser step (0: a new step starts)."""
        return self._call

    def observed(self) -> bool:
        """Whether a plugin listens to ``roclip_after_match`` (statistics cost a GPU sync).

        Asked at each matching step, so plugins registered after construction are served too.
        """
        return self.pm is not None and bool(self.pm.hook.roclip_after_match.get_hookimpls())

    def abandon(self) -> int:
        """Forget an unfinished accumulated step; returns how many of its calls had run.

        Its captions never enter the pool and its lookup is not reused: the optimiser step it
        belonged to never happened.
        """
        calls, self._call, self._running = self._call, 0, None
        return calls

    def plan(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        context: StepContext,
        ids: torch.Tensor | None = None,
    ) -> StepPlan:
        """The plan of this loss call: decided on a step's first call, reused on the others.

        ``context`` and ``ids`` (stable sample ids, int64, one per row) are read on the first
        call only.
        """
        if self._call == 0:
            self.pool.follow(image_features.device)
            plan, enqueue = self._decide(image_features, text_features, ids, context)
            self._running = _RunningStep(plan, image_features.shape[0], enqueue, context)
        return self._current(image_features).plan

    def finish(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        """A loss call is done; after a step's last, enqueue its captions and images."""
        running = self._current(image_features)
        self._call += 1
        if self._call < self.settings.accum_freq:
            return
        self._call, self._running = 0, None
        if running.enqueue:
            self._enqueue(text_features, running.context)
        if self.risk is not None:
            self.risk.after_step(image_features)

    # -- the decision ------------------------------------------------------------------------

    def _current(self, image_features: torch.Tensor) -> _RunningStep:
        """The running step; refuses a call whose batch is not the step's."""
        assert self._running is not None, "StepDecider: plan() the call first"
        rows, accum = self._running.rows, self.settings.accum_freq
        if image_features.shape[0] != rows:
            raise ValueError(
                f"loss call {self._call + 1} of {accum} of an accumulated step got "
                f"{image_features.shape[0]} rows, its first call {rows}: with "
                f"accum_freq {accum} (OpenCLIP's --accum-freq) every call of a step "
                "must carry the whole accumulated batch"
            )
        return self._running

    def _decide(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        ids: torch.Tensor | None,
        context: StepContext,
    ) -> tuple[StepPlan, bool]:
        """Plain, unimodal, matched, or the risk engine's split; and whether to enqueue."""
        enqueue = context.matching or self.settings.update_pool_when_plain
        if context.unimodal_only:
            return self._unimodal_plan(unimodal_only=True), True
        lookup = context.matching and len(self.pool) > 0
        if self.risk is not None:
            lookup = lookup and self.risk.needs_lookup
        elif not lookup:
            return PLAIN, enqueue
        indices = matched = None
        if lookup:
            indices, matched = self._lookup(image_features, text_features, ids, context)
        if self.risk is None:
            assert matched is not None and indices is not None
            return self._matching_plan(image_features, indices, matched), True
        decision = self._judge(image_features, text_features, ids, context, matched)
        if decision is None:
            return PLAIN, enqueue
        return self._risk_plan(image_features, decision, indices, matched), True

    def _lookup(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        ids: torch.Tensor | None,
        context: StepContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest pool caption of each local image (statistics to ``roclip_after_match``)."""
        check_finite_queries(image_features)
        # The search (any matcher, a plugin's too) and the statistics run in the configured
        # precision: the trainer's autocast would otherwise turn their products into bf16.
        with torch.no_grad(), autocast_disabled(image_features.device, self._pool_device()):
            indices = self.matcher(image_features.detach(), self.pool)
            matched = self.pool.gather(indices)
            if self.pm is not None and self.observed():
                stats = self._stats(image_features, text_features, matched, indices, ids, context)
                self.pm.hook.roclip_after_match(stats=stats)
        return indices, matched

    def _matching_plan(
        self, image_features: torch.Tensor, indices: torch.Tensor, matched: torch.Tensor
    ) -> StepPlan:
        """The paper's matching step: every image against its nearest pool caption."""
        matched = matched.to(image_features.device, image_features.dtype)
        all_matched = None
        if self.settings.gathers_matched:
            all_matched = gather_features(matched, self.info, keep_local_grad=False)
        ids = None
        if self.settings.duplicate_matches == "mask":
            ids = caption_ids(indices.to(image_features.device), None, self.info)
        return StepPlan(matched=matched, all_matched=all_matched, caption_ids=ids)

    def _judge(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        ids: torch.Tensor | None,
        context: StepContext,
        matched: torch.Tensor | None,
    ) -> RiskDecision | None:
        """The risk engine's split of a defended step (None: undefended, or nothing to judge)."""
        assert self.risk is not None
        defended = context.matching and (matched is not None or not self.risk.needs_lookup)
        with autocast_disabled(image_features.device, self._pool_device()):
            decision = self.risk.decide(
                image_features,
                text_features,
                matched=matched,
                ids=ids,
                defended=defended,
                epoch=context.epoch,
                step=context.step,
            )
        if decision is not None:
            self._report_risk(decision, ids, context)
        return decision

    def _risk_plan(
        self,
        image_features: torch.Tensor,
        decision: RiskDecision,
        indices: torch.Tensor | None,
        matched: torch.Tensor | None,
    ) -> StepPlan:
        """A step judged by the risk engine: its risky rows get ``match_action``."""
        device = image_features.device
        chosen = decision.risky.to(device)
        risky_all = decision.risky_all.to(device)
        if matched is not None:
            matched = matched.to(device, image_features.dtype)
        ids = None
        if indices is not None and self.settings.duplicate_matches == "mask":
            if self._action == "match":
                ids = caption_ids(indices.to(device), chosen, self.info)
        banks = self._unimodal_plan() if self._action == "unimodal" else PLAIN
        return StepPlan(
            matched=matched,
            chosen=chosen,
            caption_ids=ids,
            risky_all=risky_all,
            action=self._action,
            risk_weight=self.settings.risk_weight,
            risky_negatives=self.settings.risky_negatives == "keep",
            image_bank=banks.image_bank,
            caption_bank=banks.caption_bank,
        )

    def _unimodal_plan(self, unimodal_only: bool = False) -> StepPlan:
        """The banks' rows the unimodal terms look neighbours up in (read once per step)."""
        bank = None if self.risk is None else self.risk.image_bank
        return StepPlan(
            unimodal_only=unimodal_only,
            image_bank=None if bank is None else bank.features(),
            caption_bank=self.pool.features(),
        )

    # -- reports and the pool --------------------------------------------------------------

    def _report_risk(
        self, decision: RiskDecision, ids: torch.Tensor | None, context: StepContext
    ) -> None:
        if self.pm is None or not self.pm.hook.roclip_after_risk.get_hookimpls():
            return
        stats = RiskStats(
            epoch=context.epoch,
            step=context.step,
            ids=ids,
            risk=decision.risk,
            risky=decision.risky,
            action=self._action,
        )
        self.pm.hook.roclip_after_risk(stats=stats)

    def _pool_device(self) -> torch.device:
        return self.pool.device if self.pool.device is not None else torch.device("cpu")

    @torch.no_grad()
    def _enqueue(self, text_features: torch.Tensor, context: StepContext) -> None:
        all_text = gather_features(text_features.detach(), self.info, keep_local_grad=False)
        stored = self.pool.enqueue(all_text)
        if self.pm is not None:
            self.pm.hook.roclip_pool_updated(
                pool=self.pool, added=stored, epoch=context.epoch, step=context.step
            )

    @torch.no_grad()
    def _stats(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        matched: torch.Tensor,
        indices: torch.Tensor,
        ids: torch.Tensor | None,
        context: StepContext,
    ) -> MatchStats:
        with highest_matmul_precision():
            img = F.normalize(image_features.float(), dim=-1)
            matched_sim = (img * F.normalize(matched.float(), dim=-1)).sum(dim=-1)
            own_sim = (img * F.normalize(text_features.float(), dim=-1)).sum(dim=-1)
        return MatchStats(
            epoch=context.epoch,
            step=context.step,
            pool_fill=len(self.pool),
            pool_size=self.pool.size,
            matched_similarity=float(matched_sim.mean()),
            own_similarity=float(own_sim.mean()),
            margins=matched_sim - own_sim,
            matched_indices=indices,
            ids=ids,
        )


__all__ = ["StepContext", "StepDecider", "StepSettings", "check_accum_freq"]
