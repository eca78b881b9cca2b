"""Risk: score every pair of every step, split safe from risky, for the loss to act on.

The room of the defense that judges pairs one by one (docs/risk.md). Its public face:

- scorers (:mod:`~roclip_plugin.risk.scores`) and their registry, filled by the
  ``roclip_register_risk_scorers`` hook (built-ins: ``margin``, ``cosine``, ``history``,
  ``density``);
- splits (:mod:`~roclip_plugin.risk.split`): a fixed share, or SafeCLIP's Gaussian mixture;
- the per-sample history (:mod:`~roclip_plugin.risk.history`) and stable sample ids;
- the unimodal terms (:mod:`~roclip_plugin.risk.unimodal`) for risky pairs and the warm-up;
- :class:`RiskEngine`, which the defense asks once per optimiser step.

It imports only torch, the core's pool, its distribution helpers and the unimodal terms' math
(:mod:`roclip_plugin.contrastive`, which imports nothing of the defense): the config and the
plugin manager are handed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from roclip_plugin.risk.engine import (
    BUILTIN_SCORES,
    DEFAULT_HISTORY_SLOTS,
    RiskDecision,
    RiskEngine,
    RiskSettings,
    needs_image_bank,
    uses_engine,
)
from roclip_plugin.risk.history import BYTES_PER_SLOT, HistoryTable, stable_id, stable_ids
from roclip_plugin.risk.scores import (
    CosineScorer,
    DensityScorer,
    HistoryScorer,
    MarginScorer,
    RiskBatch,
    RiskScorer,
    largest_margins,
)
from roclip_plugin.risk.split import Mixture, MixtureSplit, fit_mixture, fixed_split, riskiest
from roclip_plugin.risk.unimodal import nearest_neighbour_loss, unimodal_loss

ScorerFactory = Callable[[Any], RiskScorer]


def builtin_scorer_factories() -> dict[str, ScorerFactory]:
    """The built-in scorers by name; each factory takes a ``RoClipConfig``."""
    return {
        "margin": lambda config: MarginScorer(),
        "cosine": lambda config: CosineScorer(),
        "history": lambda config: HistoryScorer(
            config.history_slots or DEFAULT_HISTORY_SLOTS, config.history_decay
        ),
        "density": lambda config: DensityScorer(config.density_k),
    }


def collect_scorers(pm: Any) -> dict[str, ScorerFactory]:
    """Every scorer the plugin manager's ``roclip_register_risk_scorers`` hooks register.

    A plugin registering a taken name needs ``replace=True``.
    """
    factories: dict[str, ScorerFactory] = {}

    def register(name: str, factory: ScorerFactory, replace: bool = False) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"risk scorer name {name!r}: give a non-empty string")
        if name in factories and not replace:
            raise ValueError(f"risk scorer {name!r} is registered already; pass replace=True")
        factories[name] = factory

    pm.hook.roclip_register_risk_scorers(register=register)
    return factories


def make_scorer(config: Any, pm: Any) -> RiskScorer:
    """The scorer ``config.risk_score`` names, built from its registered factory."""
    factories = collect_scorers(pm)
    if config.risk_score not in factories:
        raise ValueError(
            f"risk_score (--roclip-risk-score): unknown value {config.risk_score!r}; "
            f"registered: {', '.join(sorted(factories))}"
        )
    return factories[config.risk_score](config)


def make_engine(config: Any, pm: Any, rank: int = 0, world_size: int = 1) -> RiskEngine | None:
    """The run's engine, or None where the configuration is the paper's full matching."""
    if not uses_engine(config):
        return None
    scorer = make_scorer(config, pm)
    return RiskEngine(scorer, RiskSettings.from_config(config), rank, world_size)


__all__ = [
    "BUILTIN_SCORES",
    "BYTES_PER_SLOT",
    "CosineScorer",
    "DensityScorer",
    "HistoryScorer",
    "HistoryTable",
    "MarginScorer",
    "Mixture",
    "MixtureSplit",
    "RiskBatch",
    "RiskDecision",
    "RiskEngine",
    "RiskScorer",
    "RiskSettings",
    "ScorerFactory",
    "builtin_scorer_factories",
    "collect_scorers",
    "fit_mixture",
    "fixed_split",
    "largest_margins",
    "make_engine",
    "make_scorer",
    "nearest_neighbour_loss",
    "riskiest",
    "needs_image_bank",
    "stable_id",
    "stable_ids",
    "unimodal_loss",
    "uses_engine",
]
