"""The RoCLIP loss: CLIP's symmetric InfoNCE, against matched pool captions in matching steps.

Plain steps compute exactly OpenCLIP's ``ClipLoss`` (same gathering, ``local_loss`` and
``gather_with_grad`` semantics). Matching steps look up each local image's nearest pool caption,
gather the matches from every rank, and compute the same loss with the matched captions in
place of the batch's own. The batch's own captions are enqueued after the lookup (gathered in
rank order, so the pool is identical on every rank) and never match their own images.

OpenCLIP's gradient accumulation (``--accum-freq N``) calls the loss N times per optimiser step
on the same accumulated batch; with ``accum_freq=N`` the first call of a step takes every
decision (schedule, lookup, statistics) and the last one enqueues, so the step behaves as one
large batch. The sigmoid (SigLIP) counterpart lives in :mod:`roclip_plugin.siglip`.

The shared pieces (OpenCLIP's gathering, the plain loss, statistics) are
:mod:`roclip_plugin.contrastive`'s, importable from here too.

The loss returns losses only. Statistics go to the ``roclip_after_match`` hook: a trainer that
sums every value of the loss dict (OpenCLIP does) must never see diagnostics there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed.nn
import torch.nn.functional as F
from torch import nn

from roclip_plugin.config import DUPLICATE_MATCHES
from roclip_plugin.contrastive import (  # importable from here, as before
    CaptionIds,
    DistInfo,
    MatchStats,
    RiskStats,
    caption_ids,
    check_batch_sizes,
    contrastive_loss,
    duplicate_pairs,
    gather_features,
    largest_margins,
    retrieval_accuracy,
)
from roclip_plugin.matching import (
    Matcher,
    autocast_disabled,
    check_finite_queries,
    highest_matmul_precision,
)
from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk import (
    MarginScorer,
    RiskDecision,
    RiskEngine,
    RiskSettings,
    unimodal_loss,
)
from roclip_plugin.validation import LossInputCheck


@dataclass
class StepPlan:
    """What the first loss call of an optimiser step decided, for every call of that step.

    Under gradient accumulation the loss runs several times on the same accumulated batch;
    recomputed features may differ in the last bits, so the lookup is done once and reused:
    every call trains against the same captions.

    Attributes:
        rows: local rows of the accumulated batch (every call must bring as many).
        enqueue: whether the step's captions enter the pool (after its last call).
        matched: local matched pool rows, in the features' dtype; None for a plain step.
        all_matched: the matched rows of every rank (full matching), gathered once.
        chosen: partial matching, the rows that take a pool caption (or are dropped).
        caption_ids: which caption each row trains against (``duplicate_matches=mask``).
        risky_all: the risky rows of every rank (rank order), when the risk engine split.
        unimodal_only: the unimodal warm-up: no cross-modal term at all.
    """

    rows: int
    enqueue: bool
    matched: torch.Tensor | None = None
    all_matched: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    caption_ids: CaptionIds | None = None
    risky_all: torch.Tensor | None = None
    unimodal_only: bool = False


class RoClipLoss(nn.Module):
    """Drop-in for OpenCLIP's ``ClipLoss`` that runs RoCLIP's matching steps.

    The caller (normally :class:`roclip_plugin.defense.RoClipDefense`) sets :attr:`matching`
    before each step. ``forward`` takes and returns what ``ClipLoss.forward`` does.

    Args:
        pool: the caption pool, shared with the defense.
        matcher: maps (local image features, pool) to logical pool indices.
        info: distributed set-up.
        update_pool_when_plain: enqueue captions on plain steps too (the default policy).
        match_fraction: share of each matching step's images trained against their matched
            pool caption: 1.0 (the paper) re-pairs every image; below 1, only the images whose
            own caption is least similar to them compared with their best pool caption (the
            largest margins, the likeliest poison) are re-paired and the rest keep their own
            caption, so clean pairs go on teaching both towers in matching steps.
        match_action: what happens to those images: ``match`` pairs them with their nearest
            pool caption (RoCLIP); ``drop`` leaves them out of the step's loss, so a
            suspected pair teaches nothing (needs ``match_fraction`` below 1).
        duplicate_matches: images matched to the same pool caption: ``mask`` makes that
            caption the positive of each of them and a negative of none; ``keep`` (the
            authors' code) leaves the copies as negatives of the other images.
        accum_freq: loss calls per optimiser step (OpenCLIP's ``--accum-freq``): the first
            call of a step decides and looks up, the last one enqueues.
        on_step: called at the start of every step with no arguments (the defense uses it to
            count steps and take per-step schedule decisions).
        on_match: receives a :class:`MatchStats` after each matching step's lookup.
        wants_stats: asked before each matching step whether ``on_match`` has a listener;
            statistics (a GPU sync) are computed only then.
        on_enqueue: receives the number of rows stored after each pool update.
        on_alignment: receives the in-batch retrieval accuracy of each plain step (0-dim tensor).
        risk: the risk engine (:mod:`roclip_plugin.risk`) that judges each pair of a defended
            step; None for the paper's full matching. With it, ``match_fraction`` is the
            engine's share and the risky rows get ``match_action``.
        risk_weight: ``match_action="weight"``: the weight of a risky pair's terms.
        on_risk: receives a :class:`RiskStats` after each defended step's split.
    """

    gathers_matched = True  # full matching: gather the matched rows once per step
    weighted_objective = True  # objective() takes per-pair weights (drop, weight, unimodal)

    def __init__(
        self,
        pool: CaptionPool,
        matcher: Matcher,
        info: DistInfo | None = None,
        *,
        update_pool_when_plain: bool = True,
        match_fraction: float = 1.0,
        match_action: str = "match",
        duplicate_matches: str = "keep",
        accum_freq: int = 1,
        on_step: Callable[[], None] | None = None,
        on_match: Callable[[MatchStats], None] | None = None,
        on_enqueue: Callable[[int], None] | None = None,
        on_alignment: Callable[[torch.Tensor], None] | None = None,
        wants_stats: Callable[[], bool] | None = None,
        risk: RiskEngine | None = None,
        risk_weight: float = 0.1,
        on_risk: Callable[[RiskStats], None] | None = None,
    ) -> None:
        super().__init__()
        check_accum_freq(accum_freq)
        check_action_supported(match_action, risk, self.weighted_objective)
        if duplicate_matches not in DUPLICATE_MATCHES:
            raise ValueError(
                f"duplicate_matches (--roclip-duplicate-matches): invalid value "
                f"{duplicate_matches!r}; allowed: {', '.join(DUPLICATE_MATCHES)}"
            )
        self.pool = pool
        self.matcher = matcher
        self.info = info or DistInfo.from_env()
        self.update_pool_when_plain = update_pool_when_plain
        self.match_fraction = match_fraction
        self.match_action = match_action
        self.duplicate_matches = duplicate_matches
        self.accum_freq = accum_freq
        self.matching = False
        self.epoch = 0
        self.step = 0
        self.on_step = on_step
        self.on_match = on_match
        self.on_enqueue = on_enqueue
        self.on_alignment = on_alignment
        self.wants_stats = wants_stats or (lambda: True)
        self.check_inputs = LossInputCheck()
        if risk is None and (match_fraction < 1.0 or match_action != "match"):
            # built without a defense: partial matching judges by the margin, as it always did
            settings = RiskSettings(share=match_fraction, action=match_action, image_bank_size=0)
            risk = RiskEngine(MarginScorer(), settings, self.info.rank, self.info.world_size)
        self.risk = risk
        self.risk_weight = risk_weight
        self.on_risk = on_risk
        self.unimodal_only = False  # set by the defense during the unimodal warm-up
        self.pending_ids: torch.Tensor | None = None  # ids of the next step's rows
        self._call = 0  # index of the next call within the current optimiser step
        self._plan: StepPlan | None = None

    @property
    def call_in_step(self) -> int:
        """Index of the next loss call within its optimiser step (0: a new step starts)."""
        return self._call

    def abandon_step(self) -> int:
        """Forget an unfinished accumulated step; returns how many of its calls had run.

        Its captions never enter the pool and its lookup is not reused: the optimiser step it
        belonged to never happened.
        """
        calls, self._call, self._plan = self._call, 0, None
        return calls

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """One loss call; the step's first call decides, its last one updates the pool.

        ``logit_bias`` is added to every logit as ``ClipLoss`` does (softmax loss; the
        sigmoid loss is :class:`roclip_plugin.siglip.RoClipSigLipLoss`). ``sample_ids``
        (int64, one per row) key the per-sample history; a trainer that cannot pass them
        here sets :attr:`pending_ids` before the call.
        """
        if sample_ids is not None:
            self.pending_ids = sample_ids
        self.check_inputs(image_features, text_features, logit_scale, matching=self.matching)
        check_batch_sizes(image_features, text_features, self.info)
        if self._call == 0:
            if self.on_step is not None:
                self.on_step()
            self.pool.follow(image_features.device)
            ids, self.pending_ids = self.pending_ids, None
            self._plan = self._plan_step(image_features, text_features, ids)
        plan = self._current_plan(image_features)
        loss, accuracy = self._step_loss(
            image_features, text_features, logit_scale, logit_bias, plan
        )
        plain = plan.matched is None and plan.chosen is None and not plan.unimodal_only
        if self._call == 0 and plain and self.on_alignment is not None:
            self.on_alignment(accuracy)
        self._call += 1
        if self._call == self.accum_freq:
            self._call, self._plan = 0, None
            if plan.enqueue:
                self._enqueue(text_features)
            if self.risk is not None:
                self.risk.after_step(image_features)
        return {"contrastive_loss": loss} if output_dict else loss

    def objective(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        *,
        all_text: torch.Tensor | None = None,
        caption_ids: CaptionIds | None = None,
        weights: torch.Tensor | None = None,
        excluded: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair loss and the in-batch image-to-text accuracy (detached, 0-dim).

        The softmax CLIP loss here; :class:`~roclip_plugin.siglip.RoClipSigLipLoss` overrides
        it with the sigmoid loss, and everything else (plans, pool, statistics) is shared.
        ``weights`` and ``excluded`` are :func:`contrastive_loss`'s.
        """
        loss, logits = contrastive_loss(
            image_features,
            text_features,
            logit_scale,
            self.info,
            all_text=all_text,
            logit_bias=logit_bias,
            caption_ids=caption_ids,
            weights=weights,
            excluded=excluded,
        )
        return loss, retrieval_accuracy(logits.detach(), self.info)

    # -- internals ------------------------------------------------------------------------

    def _current_plan(self, image_features: torch.Tensor) -> StepPlan:
        """The plan of the running step; refuses a call whose batch is not the step's."""
        assert self._plan is not None
        if image_features.shape[0] != self._plan.rows:
            raise ValueError(
                f"loss call {self._call + 1} of {self.accum_freq} of an accumulated step got "
                f"{image_features.shape[0]} rows, its first call {self._plan.rows}: with "
                f"accum_freq {self.accum_freq} (OpenCLIP's --accum-freq) every call of a step "
                "must carry the whole accumulated batch"
            )
        return self._plan

    def _plan_step(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        ids: torch.Tensor | None = None,
    ) -> StepPlan:
        """Decide the step: plain, unimodal, matched, or the risk engine's split."""
        rows = image_features.shape[0]
        enqueue = self.matching or self.update_pool_when_plain
        if self.unimodal_only:
            return StepPlan(rows, True, unimodal_only=True)
        lookup = self.matching and len(self.pool) > 0
        if self.risk is not None:
            lookup = lookup and self.risk.needs_lookup
        elif not lookup:
            return StepPlan(rows, enqueue)
        indices = matched = None
        if lookup:
            indices, matched = self._lookup(image_features, text_features, ids)
        if self.risk is None:
            assert matched is not None and indices is not None
            return self._matching_plan(rows, image_features, text_features, indices, matched)
        return self._risk_plan(rows, enqueue, image_features, text_features, ids, indices, matched)

    def _lookup(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest pool caption of each local image (statistics to ``on_match``)."""
        check_finite_queries(image_features)
        # The search (any matcher, a plugin's too) and the statistics run in the configured
        # precision: the trainer's autocast would otherwise turn their products into bf16.
        with torch.no_grad(), autocast_disabled(image_features.device, self._pool_device()):
            indices = self.matcher(image_features.detach(), self.pool)
            matched = self.pool.gather(indices)
            if self.on_match is not None and self.wants_stats():
                stats = self._stats(image_features, text_features, matched, indices, ids)
                self.on_match(stats)
        return indices, matched

    def _matching_plan(
        self,
        rows: int,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        indices: torch.Tensor,
        matched: torch.Tensor,
    ) -> StepPlan:
        """The paper's matching step: every image against its nearest pool caption."""
        matched = matched.to(image_features.device, image_features.dtype)
        plan = StepPlan(rows, True, matched=matched)
        if self.gathers_matched:
            plan.all_matched = gather_features(matched, self.info, keep_local_grad=False)
        if self.duplicate_matches == "mask":
            plan.caption_ids = caption_ids(indices.to(image_features.device), None, self.info)
        return plan

    def _risk_plan(
        self,
        rows: int,
        enqueue: bool,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        ids: torch.Tensor | None,
        indices: torch.Tensor | None,
        matched: torch.Tensor | None,
    ) -> StepPlan:
        """A step judged by the risk engine: its risky rows get ``match_action``."""
        assert self.risk is not None
        defended = self.matching and (matched is not None or not self.risk.needs_lookup)
        with autocast_disabled(image_features.device, self._pool_device()):
            decision = self.risk.decide(
                image_features,
                text_features,
                matched=matched,
                ids=ids,
                defended=defended,
                epoch=self.epoch,
                step=self.step,
            )
        if decision is None:
            return StepPlan(rows, enqueue)
        self._report_risk(decision, ids)
        device = image_features.device
        chosen = decision.risky.to(device)
        plan = StepPlan(rows, True, chosen=chosen, risky_all=decision.risky_all.to(device))
        if matched is not None:
            plan.matched = matched.to(device, image_features.dtype)
        masks = self.duplicate_matches == "mask" and self.match_action == "match"
        if indices is not None and masks:
            plan.caption_ids = caption_ids(indices.to(device), chosen, self.info)
        return plan

    def _report_risk(self, decision: RiskDecision, ids: torch.Tensor | None) -> None:
        if self.on_risk is None:
            return
        self.on_risk(
            RiskStats(
                epoch=self.epoch,
                step=self.step,
                ids=ids,
                risk=decision.risk,
                risky=decision.risky,
                action=self.match_action,
            )
        )

    def _step_loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        plan: StepPlan,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one call under its step's plan (the same captions on every call)."""
        if plan.unimodal_only:
            loss = self._unimodal(image_features, text_features, None)
            # the scale stays in the graph (DDP); it has nothing to learn here
            return loss + 0.0 * logit_scale.sum(), torch.zeros((), device=image_features.device)
        if plan.chosen is None and plan.matched is None:
            return self.objective(image_features, text_features, logit_scale, logit_bias)
        if plan.chosen is not None and self.match_action != "match":
            return self._judged_loss(image_features, text_features, logit_scale, logit_bias, plan)
        if plan.chosen is not None:
            assert plan.matched is not None
            targets = torch.where(plan.chosen.unsqueeze(1), plan.matched, text_features)
            loss, accuracy = self.objective(
                image_features, targets, logit_scale, logit_bias, caption_ids=plan.caption_ids
            )
        else:
            loss, accuracy = self.objective(
                image_features,
                plan.matched,
                logit_scale,
                logit_bias,
                all_text=plan.all_matched,
                caption_ids=plan.caption_ids,
            )
        # Keep the text tower in the graph with a zero gradient, so DistributedDataParallel
        # without find_unused_parameters still finds every parameter used.
        return loss + 0.0 * text_features.sum(), accuracy

    def _judged_loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        plan: StepPlan,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """drop, weight and unimodal: the CLIP loss with the risky pairs out or down-weighted."""
        assert plan.chosen is not None and plan.risky_all is not None
        if not self.weighted_objective:  # SigLIP: drop only (refused otherwise)
            keep = ~plan.chosen
            return self.objective(
                image_features[keep], text_features[keep], logit_scale, logit_bias
            )
        risky = plan.risky_all
        if self.match_action == "weight":
            weights = torch.where(risky, self.risk_weight, 1.0).float()
            return self.objective(
                image_features, text_features, logit_scale, logit_bias, weights=weights
            )
        loss, accuracy = self.objective(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            weights=(~risky).float(),
            excluded=risky,
        )
        if self.match_action == "unimodal":
            loss = loss + self._unimodal(image_features, text_features, plan.chosen)
        return loss, accuracy

    def _unimodal(
        self, image_features: torch.Tensor, text_features: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """The unimodal terms of ``rows`` (all rows when None), scaled by their share."""
        bank = None if self.risk is None else self.risk.image_bank
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(text_features.float(), dim=-1)
        if rows is None:
            return unimodal_loss(img, txt, bank, self.pool)
        share = rows.float().mean()
        return share * unimodal_loss(img[rows], txt[rows], bank, self.pool) + 0.0 * (
            img.sum() + txt.sum()
        )

    def _pool_device(self) -> torch.device:
        return self.pool.device if self.pool.device is not None else torch.device("cpu")

    @torch.no_grad()
    def _enqueue(self, text_features: torch.Tensor) -> None:
        all_text = gather_features(text_features.detach(), self.info, keep_local_grad=False)
        stored = self.pool.enqueue(all_text)
        if self.on_enqueue is not None:
            self.on_enqueue(stored)

    @torch.no_grad()
    def _stats(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        matched: torch.Tensor,
        indices: torch.Tensor,
        ids: torch.Tensor | None = None,
    ) -> MatchStats:
        with highest_matmul_precision():
            img = F.normalize(image_features.float(), dim=-1)
            matched_sim = (img * F.normalize(matched.float(), dim=-1)).sum(dim=-1)
            own_sim = (img * F.normalize(text_features.float(), dim=-1)).sum(dim=-1)
        return MatchStats(
            epoch=self.epoch,
            step=self.step,
            pool_fill=len(self.pool),
            pool_size=self.pool.size,
            matched_similarity=float(matched_sim.mean()),
            own_similarity=float(own_sim.mean()),
            margins=matched_sim - own_sim,
            matched_indices=indices,
            ids=ids,
        )


def check_accum_freq(accum_freq: int) -> None:
    """Refuse an ``accum_freq`` that is not a positive integer, naming the flag."""
    if isinstance(accum_freq, bool) or not isinstance(accum_freq, int) or accum_freq < 1:
        raise ValueError(
            f"accum_freq (OpenCLIP's --accum-freq): invalid value {accum_freq!r}; allowed: an "
            "integer >= 1 (loss calls per optimiser step)"
        )


def check_action_supported(action: str, risk: RiskEngine | None, weighted: bool) -> None:
    """Refuse what a loss cannot do: per-pair weights in the sigmoid loss."""
    if not weighted and action in ("weight", "unimodal"):
        raise ValueError(
            f"match_action (--roclip-match-action) {action} needs per-pair weights, which the "
            "SigLIP loss (--siglip) does not take: use drop or match with --siglip"
        )


__all__ = [
    "CaptionIds",
    "DistInfo",
    "MatchStats",
    "RiskStats",
    "RoClipLoss",
    "StepPlan",
    "caption_ids",
    "check_accum_freq",
    "check_action_supported",
    "check_batch_sizes",
    "contrastive_loss",
    "duplicate_pairs",
    "gather_features",
    "largest_margins",
    "retrieval_accuracy",
]
