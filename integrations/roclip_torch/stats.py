"""Per-epoch matching statistics, collected through the ``roclip_after_match`` hook.

The collector is an ordinary plugin: it sees exactly what any user plugin sees, so the numbers
the training loop prints are the ones a logging plugin would record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from roclip_plugin.distributed import all_reduce_sum
from roclip_plugin.hookspecs import hookimpl
from roclip_plugin.loss import DistInfo, MatchStats


@dataclass(frozen=True)
class MatchSummary:
    """Matching statistics of one epoch (so far), over every rank.

    Attributes:
        matching_steps: steps that matched against the pool (the same on every rank).
        samples: images matched, summed over ranks.
        matched_similarity: mean cosine similarity of an image to its matched pool caption,
            averaged over matching steps and ranks; NaN when nothing matched.
        own_similarity: the same for an image and its own caption.
        suspicious: images whose margin (matched minus own similarity) exceeded the threshold,
            summed over ranks: poison candidates.
    """

    matching_steps: int = 0
    samples: int = 0
    matched_similarity: float = math.nan
    own_similarity: float = math.nan
    suspicious: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for logs and checkpoints."""
        return asdict(self)


class MatchStatsCollector:
    """Sums a run's ``MatchStats`` between two :meth:`reset` calls (a pluggy plugin).

    Args:
        margin: a sample counts as suspicious when its margin exceeds this (cosine units);
            normally ``RoClipConfig.suspicious_margin``.
    """

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.reset()

    def reset(self) -> None:
        """Forget everything collected (called at each epoch start)."""
        self.steps = 0
        self.samples = 0
        self.matched_sum = 0.0
        self.own_sum = 0.0
        self.suspicious = 0

    @hookimpl
    def roclip_after_match(self, stats: MatchStats) -> None:
        """Accumulate one matching step of this rank."""
        self.steps += 1
        self.samples += int(stats.margins.numel())
        self.matched_sum += stats.matched_similarity
        self.own_sum += stats.own_similarity
        self.suspicious += int((stats.margins > self.margin).sum())

    def summary(self, info: DistInfo | None = None) -> MatchSummary:
        """Statistics of the epoch so far, reduced over ranks when ``info`` says there are several.

        With several ranks this is a collective: every rank must call it.
        """
        totals = torch.tensor(
            [self.steps, self.samples, self.matched_sum, self.own_sum, self.suspicious],
            dtype=torch.float64,
        )
        world = 1 if info is None else info.world_size
        if world > 1:
            totals = all_reduce_sum(totals)
        steps_all_ranks, samples, matched, own, suspicious = totals.tolist()
        if steps_all_ranks == 0:
            return MatchSummary()
        return MatchSummary(
            matching_steps=round(steps_all_ranks / world),
            samples=round(samples),
            matched_similarity=matched / steps_all_ranks,
            own_similarity=own / steps_all_ranks,
            suspicious=round(suspicious),
        )
