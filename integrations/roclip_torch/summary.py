"""What one epoch of the :class:`~roclip_torch.loop.Trainer` did: the table's rows.

Its own module so that the loop (which makes summaries) and the report (which shows them) both
import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class EpochSummary:
    """What one epoch did, over every rank (what the table shows; kept in checkpoints).

    Attributes:
        epoch: 0-based epoch.
        steps: optimiser steps of the epoch.
        loss: mean loss over steps and ranks.
        matching: whether the schedule started the epoch as a matching one.
        matching_steps: steps that actually matched (0 while the pool is empty; with
            ``period_steps`` the schedule may switch inside an epoch).
        pool_fill: valid pool rows at the end of the epoch.
        pool_size: pool capacity.
        matched_similarity: mean image / matched-caption cosine similarity (NaN: no matching).
        own_similarity: mean image / own-caption cosine similarity in matching steps.
        suspicious: images whose margin exceeded ``suspicious_margin`` (poison candidates).
        lr: learning rate of the first parameter group at the end of the epoch.
    """

    epoch: int
    steps: int
    loss: float
    matching: bool
    matching_steps: int
    pool_fill: int
    pool_size: int
    matched_similarity: float
    own_similarity: float
    suspicious: int
    lr: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (checkpoints hold no custom classes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochSummary:
        """Inverse of :meth:`to_dict`."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})
