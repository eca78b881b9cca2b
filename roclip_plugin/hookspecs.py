"""Hook specifications: the points where plugins change or observe RoCLIP.

Every hook is prefixed ``roclip_``. Implementations may accept any subset of a spec's
arguments, so arguments can be added later without breaking plugins. Hooks run
last-registered-first; the built-in defaults are registered first and marked ``trylast``, so a
user's plugin always wins. Each hook is documented with its exact signature in docs/hooks.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from roclip_plugin.config import RoClipConfig
    from roclip_plugin.loss import MatchStats, RiskStats
    from roclip_plugin.matching import Matcher
    from roclip_plugin.pool import CaptionPool
    from roclip_plugin.schedule import ScheduleState

PROJECT = "roclip"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class DefenseView(Protocol):
    """What ``roclip_epoch_start`` observers may read of the :class:`RoClipDefense` they get.

    The argument is the defense itself; this protocol names the part an observer reads, so
    that the specifications need not import the defense, which imports the plugin manager,
    which imports these specifications (an import circle, even if a type-only one).
    """

    config: RoClipConfig
    pool: CaptionPool
    schedule: ScheduleState
    epoch: int
    step: int

    @property
    def matching(self) -> bool:
        """Whether the current step is a matching one."""


# -- configuration ----------------------------------------------------------------------------


@hookspec
def roclip_add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add a plugin's own command-line options to an integration's parser.

    Called once when an integration builds its parser, after the ``--roclip-*`` flags.
    Name options ``--roclip-<plugin>-<option>`` to avoid clashes.

    Args:
        parser: the argparse parser or argument group to add options to.
    """


@hookspec
def roclip_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add sub-commands to the ``roclip`` command line.

    Called once when ``roclip`` builds its parser. Add a parser with
    ``subparsers.add_parser(name, ...)`` and give it ``set_defaults(run=fn)``, where
    ``fn(args, console) -> int`` runs the command and returns its exit code (raise
    ``ValueError`` with a message naming the bad flag or file: ``roclip`` prints it and exits
    with 2). This is how the attack and evaluation kit (``roclip demo``, ``roclip poison``,
    ``roclip eval``) joins the command without the core importing it.

    Args:
        subparsers: the ``roclip`` parser's sub-parser collection.
    """


@hookspec
def roclip_configure(config: RoClipConfig, options: argparse.Namespace | None) -> None:
    """Receive the final configuration (and parsed options) before training starts.

    Called once per :class:`~roclip_plugin.defense.RoClipDefense`, on every rank.

    Args:
        config: the validated RoCLIP configuration.
        options: the integration's parsed arguments, or None when built from code.
    """


# -- matching ---------------------------------------------------------------------------------


@hookspec(firstresult=True)
def roclip_make_matcher(config: RoClipConfig) -> Matcher | None:
    """Return the matcher: a callable ``(image_features, pool) -> LongTensor`` of pool indices.

    The indices are logical (into ``pool.features()``, oldest first). Run
    :func:`roclip_plugin.testing.check_matcher` on yours. Under ``torch.distributed`` it must
    give the same answer on every rank for the same input. Stops at first non-None result.

    Args:
        config: the RoCLIP configuration.
    """


@hookspec(firstresult=True)
def roclip_should_match(
    epoch: int,
    step: int,
    unit: int,
    total_units: int | None,
    config: RoClipConfig,
    state: ScheduleState,
) -> bool | None:
    """Decide whether a unit (epoch, or block of steps) is a matching one.

    Called at each epoch start; with ``config.period_steps > 0`` once per block instead, when
    the next step enters a new block (at a step, or at an epoch start). The answer must be
    identical on every rank. Stops at first non-None result.

    Args:
        epoch: 0-based epoch.
        step: global step counted by the defense (0-based).
        unit: the schedule unit (``epoch``, or ``step // period_steps``).
        total_units: run length in units, when the integration knows it.
        config: the RoCLIP configuration.
        state: schedule memory (per-unit alignment accuracy).
    """


# -- augmentation -----------------------------------------------------------------------------


@hookspec
def roclip_register_augmentations(register: Callable[..., None]) -> None:
    """Register image or text augmentations by name.

    Call ``register(kind, name, factory, replace=False)`` with ``kind`` ``"image"`` or
    ``"text"`` and ``factory(config) -> callable``. Registering a taken name raises
    ``ValueError`` unless ``replace=True`` (to override a default).

    Args:
        register: the registry's callback.
    """


# -- risk -------------------------------------------------------------------------------------


@hookspec
def roclip_register_risk_scorers(register: Callable[..., None]) -> None:
    """Register risk scorers by name (``--roclip-risk-score NAME``).

    Call ``register(name, factory, replace=False)`` with ``factory(config) -> scorer``, a
    :class:`~roclip_plugin.risk.RiskScorer`: ``local(batch)`` scores this rank's rows,
    ``combine(values, ids)`` turns every rank's values into the global batch's risks (higher
    is riskier), ``needs`` and ``stateful`` say what it reads and whether it sees every step.
    Registering a taken name raises ``ValueError`` unless ``replace=True``.

    Args:
        register: the registry's callback.
    """


@hookspec
def roclip_after_risk(stats: RiskStats) -> None:
    """Observe a defended step's risk split (the local batch of this rank).

    Computed only when at least one plugin implements this hook.

    Args:
        stats: the rows' sample ids, risks, which were judged risky and what was done to them.
    """


# -- observation ------------------------------------------------------------------------------


@hookspec
def roclip_epoch_start(epoch: int, matching: bool, defense: DefenseView) -> None:
    """Observe the start of an epoch, after the schedule decided.

    Args:
        epoch: 0-based epoch.
        matching: whether the epoch starts as a matching one.
        defense: the :class:`~roclip_plugin.defense.RoClipDefense` (pool, config, state),
            for read access.
    """


@hookspec
def roclip_pool_updated(pool: CaptionPool, added: int, epoch: int, step: int) -> None:
    """Observe a pool update, after a step's captions were enqueued.

    Args:
        pool: the caption pool (read it; do not modify).
        added: rows accepted by this update (non-finite rows are refused and not counted).
        epoch: 0-based epoch.
        step: global step counted by the defense.
    """


@hookspec
def roclip_after_match(stats: MatchStats) -> None:
    """Observe a matching step's statistics (the local batch of this rank).

    Statistics are computed only when at least one plugin implements this hook.

    Args:
        stats: pool fill, mean matched and own-caption similarity, per-sample margins.
    """


def spec_names() -> list[str]:
    """Names of every hook specification in this module."""
    return sorted(n for n, v in globals().items() if n.startswith("roclip_") and callable(v))


__all__ = ["DefenseView", "hookimpl", "hookspec", "spec_names"]
