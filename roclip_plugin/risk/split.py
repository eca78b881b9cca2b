"""Splits of a step into safe and risky pairs, from the risks of the global batch.

Both splits see the same global risks on every rank, so every rank takes the same decision,
and both leave every rank at least one safe pair (a step with nothing to train on would be
empty on that rank).

- :func:`fixed_split`: the ``ceil(share * batch)`` riskiest pairs (``--roclip-match-fraction``
  of the global batch, as documented), ties to the earlier position in rank order.
- :class:`MixtureSplit`: SafeCLIP's split. A two-component Gaussian mixture is fitted to the
  running distribution of risks (a window of the latest steps' risks, so no extra pass over
  the data); a pair is safe when the posterior of the low-risk component is at least
  ``threshold``. The safe share is topped up to a floor that may grow each epoch, and the
  risky share is capped by ``--roclip-match-fraction``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

EM_ITERATIONS = 50
MIN_VARIANCE = 1e-6


def riskiest(risk: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` largest risks; ties go to the lower position."""
    count = max(0, min(int(count), risk.numel()))
    order = torch.sort(risk, descending=True, stable=True).indices
    mask = torch.zeros_like(risk, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def keep_one_per_rank(risky: torch.Tensor, risk: torch.Tensor, world_size: int) -> torch.Tensor:
    """Make the least risky pair of every rank whose pairs are all risky a safe one.

    Tensor operations only: no host synchronisation per rank on a GPU.
    """
    if world_size < 1 or risky.numel() % world_size:
        raise ValueError(f"{risky.numel()} rows do not split evenly over {world_size} ranks")
    grid = risky.view(world_size, -1)
    least = risk.view(world_size, -1).argmin(dim=1)
    release = torch.zeros_like(grid)
    release[torch.arange(world_size, device=grid.device), least] = grid.all(dim=1)
    return (grid & ~release).reshape(-1)


def fixed_split(
    risk: torch.Tensor, share: float, world_size: int = 1, keep_one: bool = True
) -> torch.Tensor:
    """The ``ceil(share * len(risk))`` riskiest pairs of the global batch.

    ``keep_one`` leaves every rank a safe pair (needed where risky pairs leave the loss).
    """
    count = math.ceil(round(share * risk.numel(), 9))
    risky = riskiest(risk, count)
    return keep_one_per_rank(risky, risk, world_size) if keep_one else risky


@dataclass(frozen=True)
class Mixture:
    """A fitted two-component 1-D Gaussian mixture (component 1 has the larger mean)."""

    weights: tuple[float, float]
    means: tuple[float, float]
    variances: tuple[float, float]

    def posterior_low(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior of the low-risk component (component 0) for each value."""
        x = x.double()
        logs = []
        for w, m, v in zip(self.weights, self.means, self.variances, strict=True):
            logs.append(
                math.log(max(w, 1e-12)) - 0.5 * math.log(2 * math.pi * v) - (x - m) ** 2 / (2 * v)
            )
        stacked = torch.stack(logs)
        return torch.softmax(stacked, dim=0)[0].float()


def fit_mixture(values: torch.Tensor, iterations: int = EM_ITERATIONS) -> Mixture | None:
    """EM for two 1-D Gaussians, deterministic (initial means at the quartiles).

    Returns None for fewer than 4 values or values with no spread.
    """
    x = values.detach().double().flatten().cpu()
    x = x[torch.isfinite(x)]
    if x.numel() < 4 or float(x.std()) < 1e-9:
        return None
    mu = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=torch.float64))
    var = torch.full((2,), float(x.var()), dtype=torch.float64)
    pi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for _ in range(iterations):
        log_p = torch.log(pi)[:, None] - 0.5 * torch.log(2 * math.pi * var)[:, None]
        log_p = log_p - (x[None, :] - mu[:, None]) ** 2 / (2 * var[:, None])
        resp = torch.softmax(log_p, dim=0)
        mass = resp.sum(1).clamp_min(1e-12)
        pi = mass / mass.sum()
        mu = (resp * x).sum(1) / mass
        var = ((resp * (x[None, :] - mu[:, None]) ** 2).sum(1) / mass).clamp_min(MIN_VARIANCE)
    order = torch.argsort(mu)
    return Mixture(
        weights=tuple(float(v) for v in pi[order]),  # type: ignore[arg-type]
        means=tuple(float(v) for v in mu[order]),  # type: ignore[arg-type]
        variances=tuple(float(v) for v in var[order]),  # type: ignore[arg-type]
    )


class MixtureSplit:
    """SafeCLIP's split over a running window of risks (see the module docstring).

    Args:
        window: risks kept (the latest steps', global batch), refitted every step.
        threshold: posterior of the low-risk component from which a pair is safe.
        max_risky: largest share of a batch called risky.
        floor_start: smallest safe share in the first defended epoch.
        floor_growth: added to the floor each defended epoch after that (capped at 1).
    """

    def __init__(
        self,
        window: int,
        threshold: float,
        max_risky: float,
        floor_start: float = 0.0,
        floor_growth: float = 0.0,
    ) -> None:
        self.window = int(window)
        self.threshold = float(threshold)
        self.max_risky = float(max_risky)
        self.floor_start = float(floor_start)
        self.floor_growth = float(floor_growth)
        self.values = torch.empty(0, dtype=torch.float32)
        self.first_epoch: int | None = None
        self.mixture: Mixture | None = None

    def observe(self, risk: torch.Tensor) -> None:
        """Add a step's global risks to the window (oldest ones leave)."""
        joined = torch.cat([self.values, risk.detach().float().cpu()])
        self.values = joined[-self.window :]

    def safe_floor(self, epoch: int) -> float:
        """The smallest safe share in ``epoch``."""
        if self.first_epoch is None:
            self.first_epoch = epoch
        grown = self.floor_start + self.floor_growth * (epoch - self.first_epoch)
        return min(1.0, max(0.0, grown))

    def __call__(
        self, risk: torch.Tensor, epoch: int, world_size: int = 1, keep_one: bool = True
    ) -> torch.Tensor:
        """The risky mask of a global batch (the window must already hold its risks)."""
        self.mixture = fit_mixture(self.values)
        rows = risk.numel()
        if self.mixture is None:
            return torch.zeros(rows, dtype=torch.bool, device=risk.device)
        safe = self.mixture.posterior_low(risk.cpu()).to(risk.device) >= self.threshold
        risky = ~safe
        floor = math.ceil(round(self.safe_floor(epoch) * rows, 9))
        most = min(math.ceil(round(self.max_risky * rows, 9)), rows - floor)
        if int(risky.sum()) > most:  # keep only the riskiest of them
            capped = torch.where(risky, risk, torch.full_like(risk, -math.inf))
            risky = riskiest(capped, max(most, 0)) & risky
        return keep_one_per_rank(risky, risk, world_size) if keep_one else risky

    def state_dict(self) -> dict[str, Any]:
        """The window and the first defended epoch."""
        return {"values": self.values.clone(), "first_epoch": self.first_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.values = state["values"].float().cpu()
        self.first_epoch = state["first_epoch"]
