"""The risk engine: score every pair of a step, split it into safe and risky pairs.

:class:`RiskEngine` is what the defense asks at the start of each optimiser step. On a defended
step (the schedule's matching units) it returns which local rows are risky; on the other
steps it only lets stateful scorers (the per-sample history) and the mixture's window observe
the step, so the memory of a pair spans the whole run. What happens to the risky rows (drop,
re-match, unimodal terms, a smaller weight) is the ``match_action`` the defense plans and the
loss computes; the engine only judges. All decisions come from values gathered from every
rank, in rank order, so they are identical everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from roclip_plugin.distributed import all_gather_rows
from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk.scores import NEEDS_IMAGE_BANK, NEEDS_MATCHED, RiskBatch, RiskScorer
from roclip_plugin.risk.split import MixtureSplit, fixed_split

DEFAULT_HISTORY_SLOTS = 2**20
BUILTIN_SCORES = ("margin", "cosine", "history", "density")


@dataclass(frozen=True)
class RiskDecision:
    """One defended step's judgement.

    Attributes:
        risk: ``[batch]`` risks of this rank's rows (higher is riskier).
        risky: ``[batch]`` boolean, this rank's risky rows.
        risky_all: ``[world * batch]`` risky rows of every rank, in rank order.
    """

    risk: torch.Tensor
    risky: torch.Tensor
    risky_all: torch.Tensor


@dataclass(frozen=True)
class RiskSettings:
    """The engine's part of the configuration (see ``RoClipConfig`` for each field)."""

    split: str = "fixed"
    share: float = 0.1
    action: str = "drop"
    image_bank_size: int = 0
    gmm_threshold: float = 0.9
    gmm_window: int = 16384
    safe_share_start: float = 0.0
    safe_share_growth: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> RiskSettings:
        """Read the fields from a ``RoClipConfig``."""
        bank = config.image_bank_size if needs_image_bank(config) else 0
        if config.risk_score not in BUILTIN_SCORES:  # a plugin's scorer may read the bank
            bank = config.image_bank_size
        return cls(
            split=config.risk_split,
            share=config.match_fraction,
            action=config.match_action,
            image_bank_size=bank,
            gmm_threshold=config.gmm_threshold,
            gmm_window=config.gmm_window,
            safe_share_start=config.safe_share_start,
            safe_share_growth=config.safe_share_growth,
        )


def needs_image_bank(config: Any) -> bool:
    """Whether a configuration keeps a bank of recent image embeddings."""
    return (
        config.match_action == "unimodal"
        or config.unimodal_warmup_epochs > 0
        or config.risk_score == "density"
    )


def uses_engine(config: Any) -> bool:
    """Whether a configuration judges pairs one by one (else: the paper's full matching)."""
    return config.unimodal_warmup_epochs > 0 or not (
        config.match_fraction >= 1.0
        and config.match_action == "match"
        and config.risk_split == "fixed"
    )


class RiskEngine:
    """Scores and splits the steps of one run (one per process).

    Args:
        scorer: the risk scorer (``--roclip-risk-score``).
        settings: split, share, action and banks.
        rank: this process's rank.
        world_size: processes in the run.
    """

    def __init__(
        self, scorer: RiskScorer, settings: RiskSettings, rank: int = 0, world_size: int = 1
    ) -> None:
        self.scorer = scorer
        self.settings = settings
        self.rank, self.world_size = rank, world_size
        size = settings.image_bank_size
        if NEEDS_IMAGE_BANK in scorer.needs and size < 1:
            raise ValueError(
                "this risk score reads a bank of recent images: set --roclip-image-bank-size >= 1"
            )
        self.image_bank = CaptionPool(size) if size > 0 else None
        self.mixture: MixtureSplit | None = None
        if settings.split == "gmm":
            self.mixture = MixtureSplit(
                settings.gmm_window,
                settings.gmm_threshold,
                settings.share,
                settings.safe_share_start,
                settings.safe_share_growth,
            )

    @property
    def needs_lookup(self) -> bool:
        """Whether a defended step must look up each image's nearest pool caption."""
        return self.settings.action == "match" or NEEDS_MATCHED in self.scorer.needs

    @property
    def observes_plain_steps(self) -> bool:
        """Whether undefended steps are scored too (a memory or a running window)."""
        return self.scorer.stateful or (
            self.mixture is not None and NEEDS_MATCHED not in self.scorer.needs
        )

    @torch.no_grad()
    def decide(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        *,
        matched: torch.Tensor | None,
        ids: torch.Tensor | None,
        defended: bool,
        epoch: int,
        step: int,
    ) -> RiskDecision | None:
        """Score a step; the split of a defended step, None for an undefended one."""
        if not defended and not self.observes_plain_steps:
            return None
        if NEEDS_MATCHED in self.scorer.needs and matched is None:
            return None
        batch = RiskBatch(
            image=F.normalize(image_features.detach().float(), dim=-1),
            text=F.normalize(text_features.detach().float(), dim=-1),
            matched=None if matched is None else F.normalize(matched.float(), dim=-1),
            ids=None if ids is None else ids.to(image_features.device),
            image_bank=self.image_bank,
            epoch=epoch,
            step=step,
        )
        local = self.scorer.local(batch).float()
        rows = local.shape[0]
        values = all_gather_rows(local, self.world_size)
        all_ids = None if batch.ids is None else all_gather_rows(batch.ids, self.world_size)
        risk = self.scorer.combine(values, all_ids).float()
        if self.mixture is not None:
            self.mixture.observe(risk)
        if not defended:
            return None
        keep_one = self.settings.action in ("drop", "unimodal")  # risky pairs leave the loss
        if self.mixture is not None:
            risky_all = self.mixture(risk, epoch, self.world_size, keep_one)
        else:
            risky_all = fixed_split(risk, self.settings.share, self.world_size, keep_one)
        part = slice(self.rank * rows, (self.rank + 1) * rows)
        return RiskDecision(risk=risk[part], risky=risky_all[part], risky_all=risky_all)

    @torch.no_grad()
    def after_step(self, image_features: torch.Tensor) -> None:
        """Enqueue the step's images (every rank's, in rank order) into the image bank."""
        if self.image_bank is None:
            return
        rows = F.normalize(image_features.detach().float(), dim=-1)
        self.image_bank.follow(rows.device)
        self.image_bank.enqueue(all_gather_rows(rows, self.world_size))

    def state_dict(self) -> dict[str, Any]:
        """Scorer memory, mixture window and image bank."""
        state: dict[str, Any] = {}
        if hasattr(self.scorer, "state_dict"):
            state["scorer"] = self.scorer.state_dict()
        if self.mixture is not None:
            state["mixture"] = self.mixture.state_dict()
        if self.image_bank is not None:
            state["image_bank"] = self.image_bank.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (parts this run does not keep are ignored)."""
        if "scorer" in state and hasattr(self.scorer, "load_state_dict"):
            self.scorer.load_state_dict(state["scorer"])
        if self.mixture is not None and "mixture" in state:
            self.mixture.load_state_dict(state["mixture"])
        if self.image_bank is not None and "image_bank" in state:
            self.image_bank.load_state_dict(state["image_bank"])
