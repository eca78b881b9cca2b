"""What matching did: the tensor path's audit of the caption pool, epoch by epoch.

:class:`MatchAudit` is a plugin on the defense's hooks that knows which training row each pool
caption came from; :class:`MatchingEpoch` is what it reports for one epoch (purity, the poison's
class, self-matches, the risk split) and where the epoch's ``suspicious_epoch_N.csv`` went. The
margins, the risk split's counts and the most suspicious rows are the core's collector's
(:mod:`roclip_plugin.stats`, :attr:`MatchAudit.stats`), the one every trainer uses; what is
left here needs the pool mirror and the class labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from roclip_kit.data.tensors import BACKDOOR, CLEAN, TARGETED, PoisonedData
from roclip_plugin import hookimpl
from roclip_plugin.config import RoClipConfig
from roclip_plugin.contrastive import RiskStats
from roclip_plugin.loss import MatchStats
from roclip_plugin.pool import CaptionPool
from roclip_plugin.stats import SUSPICIOUS_TOP, MatchStatsCollector, write_suspicious


@dataclass
class MatchingEpoch:
    """What matching did in one epoch, scored against the dataset's labels.

    Attributes:
        steps: matching steps.
        images: clean images matched.
        purity: share of clean images matched to a caption of their own class.
        poisoned: poisoned images matched.
        poison_class: share of poisoned images matched to a caption of their poison's class
            (the class the attacker wanted them read as): low means the link is broken.
        self_matches: share of all matched images whose matched caption is their own caption
            of an earlier epoch (a pool holding a large part of the data hands that back).
        suspicious_file: the epoch's ``suspicious_epoch_N.csv``, if written.
        risk_steps: steps the risk split judged.
        risky: pairs judged risky.
        risk_precision: share of the risky pairs that are poisoned.
        risk_recall: share of the poisoned pairs of judged steps that were judged risky.
        risk_recall_targeted: the same over the targeted attack's pairs only.
        risk_recall_backdoor: the same over the backdoor's pairs only. The two attacks fit
            the model differently (a target's copies share one image, a trigger's images
            share a pattern), so one can slip through while the overall recall stays high.
    """

    steps: int = 0
    images: int = 0
    purity: float | None = None
    poisoned: int = 0
    poison_class: float | None = None
    self_matches: float | None = None
    suspicious_file: str | None = None
    risk_steps: int = 0
    risky: int = 0
    risk_precision: float | None = None
    risk_recall: float | None = None
    risk_recall_targeted: float | None = None
    risk_recall_backdoor: float | None = None


_ATTACKS = (TARGETED, BACKDOOR)


class MatchAudit:
    """Mirrors the caption pool with the training row of each caption (a pluggy plugin).

    The loop sets :attr:`batch_rows` before each loss call; ``roclip_after_match`` then sees the
    lookup of that batch and ``roclip_pool_updated`` the enqueue of its captions, both in the
    same call. Single process only (the rows of other ranks' captions are not known here).

    Args:
        data: the dataset: caption classes (the CSV labels), image classes, poison kinds.
        keep: suspicious rows kept per epoch.
        margin: the collector's suspicious margin (``RoClipConfig.suspicious_margin``).

    Register :attr:`stats` with it (the adapter then uses it as its own collector).
    """

    def __init__(
        self,
        data: PoisonedData,
        keep: int = SUSPICIOUS_TOP,
        margin: float = RoClipConfig.suspicious_margin,
    ) -> None:
        self.captions = data.train.captions
        self.stats = MatchStatsCollector(margin, keep=keep, poisoned=data.poison_kind != CLEAN)
        self.caption_labels = data.train.labels
        self.image_labels = data.image_labels
        self.poison_kind = data.poison_kind
        self.pool: CaptionPool | None = None
        self.slot_rows: torch.Tensor | None = None
        self.batch_rows: torch.Tensor | None = None
        self.in_sync = True
        self.reset()

    def reset(self) -> None:
        """Forget the epoch's counts (the pool mirror is kept)."""
        self.steps = 0
        self.counts = torch.zeros(5, dtype=torch.long)  # clean, pure, poisoned, to poison, self
        self.risk_counts = torch.zeros(len(_ATTACKS), 2, dtype=torch.long)  # judged, risky
        self.stats.reset()

    def state_dict(self) -> dict[str, Any]:
        """The pool mirror, for a checkpoint: a resumed run's figures need the rows it held.

        Saved oldest caption first, as the pool saves its rows: a reloaded pool lays them out
        from slot 0, not where they were, so physical slots would point at other captions.
        """
        if self.pool is None or self.slot_rows is None:
            return {"rows": None, "in_sync": self.in_sync}
        logical = self.pool.physical_slots(torch.arange(len(self.pool)))
        return {"rows": self.slot_rows[logical].clone(), "in_sync": self.in_sync}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into the mirror of :attr:`pool`, already restored.

        The epoch's counts are not saved: they start afresh with every epoch.
        """
        rows = state["rows"]
        self.in_sync = bool(state["in_sync"])
        if rows is None or self.pool is None:
            self.slot_rows = None
            return
        self.slot_rows = torch.full((self.pool.size,), -1, dtype=torch.long)
        self.slot_rows[self.pool.physical_slots(torch.arange(len(rows)))] = rows

    @hookimpl
    def roclip_pool_updated(self, pool: CaptionPool, added: int) -> None:
        """Record which rows' captions the newest pool slots hold."""
        rows = self.batch_rows
        if rows is None or added != len(rows):  # refused rows: the mirror cannot follow
            self.in_sync = False
            return
        if self.slot_rows is None:
            self.slot_rows = torch.full((pool.size,), -1, dtype=torch.long)
        kept = min(added, pool.size)
        logical = torch.arange(len(pool) - kept, len(pool))
        self.slot_rows[pool.physical_slots(logical)] = rows[-kept:].cpu()

    @hookimpl
    def roclip_after_match(self, stats: MatchStats) -> None:
        """Score one matching step's lookup (not once the mirror lost track of the pool).

        A pool that refused rows no longer holds the captions the mirror says: purity and the
        poison-class share would be counted against the wrong rows, so nothing is counted.
        """
        if self.pool is None or self.slot_rows is None or self.batch_rows is None:
            return
        if not self.in_sync:
            return
        rows = self.batch_rows.cpu()
        slots = self.pool.physical_slots(stats.matched_indices.cpu())
        matched_rows = self.slot_rows[slots]
        matched_class = self.caption_labels[matched_rows.clamp_min(0)]
        clean = self.poison_kind[rows] == CLEAN
        pure = matched_class == self.image_labels[rows]
        to_poison = matched_class == self.caption_labels[rows]
        own = matched_rows == rows
        self.counts += torch.stack(
            [
                clean.sum(),
                (pure & clean).sum(),
                (~clean).sum(),
                (to_poison & ~clean).sum(),
                own.sum(),
            ]
        )
        self.steps += 1

    @hookimpl
    def roclip_after_risk(self, stats: RiskStats) -> None:
        """Count each attack's pairs in a judged step, and how many of them were risky."""
        if stats.ids is None:
            return
        kinds = self.poison_kind[stats.ids.cpu()]
        risky = stats.risky.cpu()
        for i, kind in enumerate(_ATTACKS):
            of_kind = kinds == kind
            self.risk_counts[i] += torch.stack([of_kind.sum(), (of_kind & risky).sum()])

    def _attack_recall(self, kind: int) -> float | None:
        judged, risky = self.risk_counts[_ATTACKS.index(kind)].tolist()
        return risky / judged if judged else None

    def summary(self) -> MatchingEpoch:
        """The epoch's figures (None where nothing was counted)."""
        clean, pure, poisoned, to_poison, own = self.counts.tolist()
        matched = clean + poisoned
        risk = self.stats.risk
        return MatchingEpoch(
            risk_steps=risk.steps,
            risky=risk.risky,
            risk_precision=risk.precision,
            risk_recall=risk.recall,
            risk_recall_targeted=self._attack_recall(TARGETED),
            risk_recall_backdoor=self._attack_recall(BACKDOOR),
            steps=self.steps,
            images=clean,
            purity=pure / clean if clean else None,
            poisoned=poisoned,
            poison_class=to_poison / poisoned if poisoned else None,
            self_matches=own / matched if matched else None,
        )

    def write_suspicious(self, path: Path) -> Path | None:
        """The epoch's most suspicious rows (the collector's), or None when none was seen."""
        rows = self.stats.suspicious_rows(self._describe)
        return write_suspicious(path, rows) if rows else None

    def _describe(self, row: int | None, payload: object) -> tuple[int, str, str]:
        """(index, key, caption) of a training row: the kit's rows have no keys."""
        index = -1 if row is None else row
        return index, "", self.captions[index] if index >= 0 else ""
