"""The RoCLIP loss: CLIP's symmetric InfoNCE on the tensors of a step's plan, and nothing else.

A training step has one way through: the defense (:class:`roclip_plugin.defense.RoClipDefense`)
decides the step (plain, matched, the risk split's action, the unimodal warm-up) and hands the
decision over as a :class:`StepPlan` of tensors; :class:`RoClipLoss` turns image and text
features, the logit scale and that plan into the loss. The loss holds no pool, no matcher, no
schedule and no hook, and never calls back into the defense: it is pure math, testable on
tensors alone, and the same plan gives the same loss on every call of an accumulated step.

Plain steps compute exactly OpenCLIP's ``ClipLoss`` (same gathering, ``local_loss`` and
``gather_with_grad`` semantics); matched steps compute the same loss with the matched captions
in place of the batch's own. The sigmoid (SigLIP) counterpart lives in
:mod:`roclip_plugin.siglip`; the shared pieces (gathering, the plain loss, statistics) are
:mod:`roclip_plugin.contrastive`'s, importable from here too.

The loss returns losses only: a trainer that sums every value of the loss dict (OpenCLIP does)
must never see diagnostics there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    retrieval_accuracy,
    unimodal_terms,
)


@dataclass(frozen=True)
class StepPlan:
    """What the defense decided for one optimiser step, as the tensors the loss needs.

    Every loss call of the step gets the same plan (under gradient accumulation recomputed
    features may differ in the last bits, so the decision is taken once): every call trains
    against the same captions. The default plan is a plain CLIP step.

    Attributes:
        matched: local matched pool rows, in the features' dtype; None: no lookup.
        all_matched: the matched rows of every rank (full matching), gathered once.
        chosen: the risk split's rows that get ``action`` (None: every row is re-paired, the
            paper's full matching, when ``matched`` is set).
        caption_ids: which caption each row trains against (``duplicate_matches=mask``).
        risky_all: the risky rows of every rank (rank order), when the risk engine split.
        action: what the chosen rows get: ``match``, ``drop``, ``weight`` or ``unimodal``.
        risk_weight: ``action="weight"``: the weight of a risky pair's terms.
        risky_negatives: ``drop`` and ``unimodal``: the risky pairs' images and captions stay
            negatives of the other pairs (only their own link leaves the loss).
        unimodal_only: the unimodal warm-up: no cross-modal term at all.
        image_bank: the image bank's rows, for the unimodal terms (None: no bank).
        caption_bank: the caption pool's rows, for the unimodal terms.
    """

    matched: torch.Tensor | None = None
    all_matched: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    caption_ids: CaptionIds | None = None
    risky_all: torch.Tensor | None = None
    action: str = "match"
    risk_weight: float = 0.1
    risky_negatives: bool = False
    unimodal_only: bool = False
    image_bank: torch.Tensor | None = None
    caption_bank: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """A plain CLIP step: the batch's own captions, every pair, full weight."""
        return self.matched is None and self.chosen is None and not self.unimodal_only


PLAIN = StepPlan()


class RoClipLoss(nn.Module):
    """CLIP's loss under a :class:`StepPlan`; a drop-in for OpenCLIP's ``ClipLoss`` without one.

    Built by the defense (``RoClipDefense.criterion``); trainers call the defense
    (``defense.compute_loss`` or its drop-in ``defense.loss``), which plans each step and
    calls this. ``forward`` takes what ``ClipLoss.forward`` does, plus the plan.

    Args:
        info: distributed set-up (OpenCLIP's rank, world size, ``local_loss``,
            ``gather_with_grad``); read from ``torch.distributed`` when omitted.
    """

    gathers_matched = True  # full matching: the plan carries the matched rows of every rank
    weighted_objective = True  # objective() takes per-pair weights (drop, weight, unimodal)

    def __init__(self, info: DistInfo | None = None, *legacy_args: Any, **legacy: Any) -> None:
        super().__init__()
        if legacy_args or legacy or (info is not None and not isinstance(info, DistInfo)):
            raise TypeError(
                f"{type(self).__name__} is the loss alone now: it takes a DistInfo and computes "
                "the loss of a StepPlan. The pool, the matcher, the settings and the callbacks "
                "belong to the defense: build a RoClipDefense (or a roclip_plugin.step."
                "StepDecider) and call defense.compute_loss / defense.loss"
            )
        self.info = info or DistInfo.from_env()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        plan: StepPlan = PLAIN,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The loss of one call under ``plan`` (plain: exactly ``ClipLoss``)."""
        loss, _ = self.step_loss(image_features, text_features, logit_scale, logit_bias, plan)
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
        it with the sigmoid loss, and the plan's actions are shared.
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

    def step_loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        plan: StepPlan,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one call and its in-batch accuracy (the schedule's alignment signal)."""
        if plan.unimodal_only:
            loss = self._unimodal(image_features, text_features, None, plan)
            # the scale stays in the graph (DDP); it has nothing to learn here
            return loss + 0.0 * logit_scale.sum(), torch.zeros((), device=image_features.device)
        if plan.chosen is None and plan.matched is None:
            return self.objective(image_features, text_features, logit_scale, logit_bias)
        if plan.chosen is not None and plan.action != "match":
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
        if plan.action == "weight":
            weights = torch.where(risky, plan.risk_weight, 1.0).float()
            return self.objective(
                image_features, text_features, logit_scale, logit_bias, weights=weights
            )
        loss, accuracy = self.objective(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            weights=(~risky).float(),
            excluded=None if plan.risky_negatives else risky,
        )
        if plan.action == "unimodal":
            loss = loss + self._unimodal(image_features, text_features, plan.chosen, plan)
        return loss, accuracy

    @staticmethod
    def _unimodal(
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        rows: torch.Tensor | None,
        plan: StepPlan,
    ) -> torch.Tensor:
        """The unimodal terms of ``rows`` (all rows when None), scaled by their share."""
        banks = plan.image_bank, plan.caption_bank
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(text_features.float(), dim=-1)
        if rows is None:
            return unimodal_terms(img, txt, *banks)
        share = rows.float().mean()
        return share * unimodal_terms(img[rows], txt[rows], *banks) + 0.0 * (img.sum() + txt.sum())


def check_action_supported(
    action: str, weighted: bool, world_size: int = 1, risky_negatives: str = "out"
) -> None:
    """Refuse what a loss cannot do: per-pair weights in the sigmoid loss, a drop across ranks.

    Checked when the defense is built, so a run stops before training rather than at its
    first defended step.
    """
    if weighted:
        return
    if action == "drop" and risky_negatives == "keep":
        raise ValueError(
            "risky_negatives (--roclip-risky-negatives) keep needs per-pair weights, which the "
            "SigLIP loss (--siglip) does not take: use --roclip-risky-negatives out with "
            "--siglip"
        )
    if action in ("weight", "unimodal"):
        raise ValueError(
            f"match_action (--roclip-match-action) {action} needs per-pair weights, which the "
            "SigLIP loss (--siglip) does not take: use drop or match with --siglip"
        )
    if action == "drop" and world_size > 1:
        raise ValueError(
            f"match_action (--roclip-match-action) drop with the SigLIP loss (--siglip) on "
            f"{world_size} processes: dropping a rank's risky rows changes its batch size, and "
            "SigLIP's exchange of caption blocks between ranks needs equal ones. Use "
            "--roclip-match-action match (or --roclip-preset paper) with --siglip on several "
            "processes, or the CLIP loss"
        )


__all__ = [
    "PLAIN",
    "CaptionIds",
    "DistInfo",
    "MatchStats",
    "RiskStats",
    "RoClipLoss",
    "StepPlan",
    "caption_ids",
    "check_action_supported",
    "check_batch_sizes",
    "contrastive_loss",
    "duplicate_pairs",
    "gather_features",
    "retrieval_accuracy",
]
