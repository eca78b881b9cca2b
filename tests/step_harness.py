"""One step as the defense runs it, for tests of a single loss call: plan, compute, finish.

:class:`StepHarness` stands where the old self-deciding loss stood in these tests: a
:class:`~roclip_plugin.step.StepDecider` plans each call (hooks to recorder callbacks), the
pure loss computes from the plan, and the harness finishes the call. ``matching``, ``epoch``,
``step`` and ``unimodal_only`` are the schedule's answers a defense would give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy
import torch

from roclip_plugin.hookspecs import hookimpl
from roclip_plugin.loss import DistInfo, RoClipLoss
from roclip_plugin.matching import Matcher
from roclip_plugin.plugins import get_plugin_manager
from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk import RiskEngine
from roclip_plugin.step import StepContext, StepDecider, StepSettings


class _Relay:
    """Hands hook calls to plain callbacks."""

    def __init__(self, on_match: Callable | None, on_risk: Callable | None) -> None:
        if on_match is not None:
            self.roclip_after_match = hookimpl(lambda stats: on_match(stats))
        if on_risk is not None:
            self.roclip_after_risk = hookimpl(lambda stats: on_risk(stats))


class StepHarness:
    """Decider plus loss, called like ``ClipLoss``; ``loss_class`` picks softmax or SigLIP."""

    def __init__(
        self,
        pool: CaptionPool,
        matcher: Matcher,
        info: DistInfo | None = None,
        *,
        loss_class: type[RoClipLoss] = RoClipLoss,
        on_match: Callable | None = None,
        on_risk: Callable | None = None,
        on_alignment: Callable[[torch.Tensor], None] | None = None,
        risk: RiskEngine | None = None,
        **settings: Any,
    ) -> None:
        self.pool = pool
        self.criterion = loss_class(info or DistInfo())
        gathers = loss_class.gathers_matched
        self.pm: pluggy.PluginManager = get_plugin_manager()
        self.pm.register(_Relay(on_match, on_risk))
        self.decider = StepDecider(
            pool,
            matcher,
            self.criterion.info,
            StepSettings(gathers_matched=gathers, **settings),
            risk=risk,
            plugin_manager=self.pm,
        )
        self.on_alignment = on_alignment
        self.on_step: Callable[[], None] | None = None
        self.matching = False
        self.unimodal_only = False
        self.epoch = self.step = 0
        self.pending_ids: torch.Tensor | None = None

    @property
    def call_in_step(self) -> int:
        return self.decider.call_in_step

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if sample_ids is not None:
            self.pending_ids = sample_ids
        first = self.decider.call_in_step == 0
        if first and self.on_step is not None:
            self.on_step()
        context = StepContext(self.matching, self.unimodal_only, self.epoch, self.step)
        ids, self.pending_ids = (self.pending_ids, None) if first else (None, self.pending_ids)
        plan = self.decider.plan(image_features, text_features, context, ids)
        loss, accuracy = self.criterion.step_loss(
            image_features, text_features, logit_scale, logit_bias, plan
        )
        if first and plan.plain and self.on_alignment is not None:
            self.on_alignment(accuracy)
        self.decider.finish(image_features, text_features)
        return {"contrastive_loss": loss} if output_dict else loss
