"""Risk scorers: how likely each pair of a step is to be poisoned, higher is riskier.

Every scorer reads only what the step computes anyway (its normalised image and caption
embeddings, their nearest pool captions, a bank of recent image embeddings) and works in two
phases so that a decision is identical on every rank under ``torch.distributed``:

1. :meth:`RiskScorer.local` scores this rank's rows (a ``[batch]`` float32 tensor);
2. the engine gathers those values (and the sample ids) of every rank, in rank order, and
   :meth:`RiskScorer.combine` turns them into the global batch's risks. Stateful scorers (the
   per-sample history) update their state here, from the same global values on every rank.

Built-ins (``--roclip-risk-score``): ``margin`` (how much better the nearest pool caption fits
the image than its own: RoCLIP's partial matching), ``cosine`` (the pair's own cosine, low is
risky: SafeCLIP's score), ``history`` (the per-sample memory of the within-batch z-scored own
cosine, :mod:`roclip_plugin.risk.history`) and ``density`` (closeness of the image to its k-th
nearest neighbour among recent images: a backdoor's triggered images form a tight cluster).
A plugin adds its own through the ``roclip_register_risk_scorers`` hook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk.history import HistoryTable
from roclip_plugin.risk.split import riskiest

NEEDS_MATCHED = "matched"
NEEDS_IDS = "ids"
NEEDS_IMAGE_BANK = "image_bank"


@dataclass(frozen=True)
class RiskBatch:
    """What a scorer may read about this rank's rows of one step (all detached).

    Attributes:
        image: ``[batch, dim]`` L2-normalised image embeddings, float32.
        text: ``[batch, dim]`` L2-normalised embeddings of each image's own caption.
        matched: the nearest pool caption of each image, when the step looked them up.
        ids: stable sample ids (int64), when the data path gives them.
        image_bank: recent image embeddings (before this step's), when kept.
        epoch: 0-based epoch.
        step: global step counted by the defense.
    """

    image: torch.Tensor
    text: torch.Tensor
    matched: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    image_bank: CaptionPool | None = None
    epoch: int = 0
    step: int = 0

    def own_cosine(self) -> torch.Tensor:
        """Cosine of each image with its own caption."""
        return (self.image * self.text).sum(-1)


@runtime_checkable
class RiskScorer(Protocol):
    """What a risk scorer provides (see the module docstring for the two phases).

    Attributes:
        needs: inputs it reads besides the embeddings: ``"matched"``, ``"ids"``,
            ``"image_bank"``.
        stateful: whether it must see every step, defended or not (it keeps a memory).
    """

    needs: frozenset[str]
    stateful: bool

    def local(self, batch: RiskBatch) -> torch.Tensor:
        """Per-row values of this rank's rows."""

    def combine(self, values: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Risks of the global batch from every rank's values (rank order)."""


class _Stateless:
    needs: frozenset[str] = frozenset()
    stateful = False

    def combine(self, values: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Risks of the global batch; the memory is updated here, the same on every rank."""
        return values

    def state_dict(self) -> dict[str, Any]:
        """The memory table, for exact resume."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


class MarginScorer(_Stateless):
    """``cos(image, nearest pool caption) - cos(image, own caption)``: RoCLIP's margin.

    Large when the image's own caption fits it much worse than a caption other images
    brought, as a caption naming another class does.
    """

    needs = frozenset({NEEDS_MATCHED})

    def local(self, batch: RiskBatch) -> torch.Tensor:
        """Per-row values of this rank's rows (see :class:`RiskScorer`)."""
        if batch.matched is None:
            raise ValueError("the margin risk score needs the step's nearest pool captions")
        return (batch.image * batch.matched).sum(-1) - batch.own_cosine()


class CosineScorer(_Stateless):
    """``-cos(image, own caption)``: SafeCLIP's score (a poorly fitting pair is risky)."""

    def local(self, batch: RiskBatch) -> torch.Tensor:
        """Per-row values of this rank's rows (see :class:`RiskScorer`)."""
        return -batch.own_cosine()


def zscore(values: torch.Tensor) -> torch.Tensor:
    """Standardise within the batch, so scores of early and late epochs are comparable."""
    if values.numel() < 2:
        return torch.zeros_like(values)
    std = values.std(unbiased=False).clamp_min(1e-6)
    return (values - values.mean()) / std


class HistoryScorer:
    """The per-sample memory of the pair's fit: risk is minus the EMA of its z-scored cosine.

    Each visit z-scores the pair's own cosine within the global batch (how well it fits next
    to the pairs it trains with) and blends it into the sample's memory
    (:class:`~roclip_plugin.risk.history.HistoryTable`); a sample is judged on its record, so
    a poisoned pair the model has since learned to fit is still remembered as a bad fit.
    """

    needs = frozenset({NEEDS_IDS})
    stateful = True

    def __init__(self, slots: int, decay: float) -> None:
        self.table = HistoryTable(slots, decay)

    def local(self, batch: RiskBatch) -> torch.Tensor:
        """Per-row values of this rank's rows (see :class:`RiskScorer`)."""
        if batch.ids is None:
            raise ValueError(
                "the history risk score (the robust preset's) needs stable sample ids: pass "
                "sample_ids= to the loss (or defense.set_sample_ids(ids) before it), or use "
                "--roclip-risk-score margin (risk_score='margin': no memory across epochs) or "
                "--roclip-preset paper; see docs/risk.md"
            )
        return batch.own_cosine()

    def combine(self, values: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Risks of the global batch; the memory is updated here, the same on every rank."""
        assert ids is not None
        return -self.table.update(ids, zscore(values.float()))

    def state_dict(self) -> dict[str, Any]:
        """The memory table, for exact resume."""
        return {"table": self.table.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.table.load_state_dict(state["table"])


class DensityScorer(_Stateless):
    """Closeness of each image to its k-th nearest recent image (k-distance, negated).

    Triggered images of a backdoor look alike to a model that learned the trigger, so they sit
    in a dense cluster: a small distance to the k-th neighbour is risky. Scored against a bank
    of recent images' embeddings (before this step's); zero until the bank holds k rows.
    """

    needs = frozenset({NEEDS_IMAGE_BANK})

    def __init__(self, k: int) -> None:
        self.k = int(k)

    def local(self, batch: RiskBatch) -> torch.Tensor:
        """Per-row values of this rank's rows (see :class:`RiskScorer`)."""
        bank = batch.image_bank
        if bank is None or len(bank) < self.k:
            return torch.zeros(batch.image.shape[0], device=batch.image.device)
        sims = batch.image @ bank.features().to(batch.image.device, torch.float32).T
        kth = sims.topk(self.k, dim=1).values[:, -1]
        return kth - 1.0  # = -(1 - cos): minus the k-distance in cosine distance


@torch.no_grad()
def largest_margins(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    matched: torch.Tensor,
    fraction: float,
) -> torch.Tensor:
    """Boolean mask of the ``ceil(fraction * batch)`` images with the largest margins.

    The margin is ``cos(image, matched caption) - cos(image, own caption)`` in float32 (the
    risk room's ``margin`` score): large when the image's own caption fits it much worse than
    a caption other images brought, as a poisoned caption does. Ties go to the lower batch
    position. The defense takes this decision through the risk engine (:class:`RiskEngine`).
    """
    batch = RiskBatch(
        image=F.normalize(image_features.float(), dim=-1),
        text=F.normalize(text_features.float(), dim=-1),
        matched=F.normalize(matched.float(), dim=-1),
    )
    margins = MarginScorer().local(batch)
    return riskiest(margins, math.ceil(fraction * margins.numel()))
