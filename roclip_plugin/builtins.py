"""The built-in defaults, registered as an ordinary plugin so user plugins can override them.

Every ``firstresult`` default is ``trylast``: any plugin that answers wins. Registrations run
``tryfirst``, so a plugin can replace a default name with ``replace=True``.
"""

from __future__ import annotations

from collections.abc import Callable

from roclip_plugin.augment import (
    eda_factory,
    identity_factory,
    roclip_image_factory,
    roclip_light_image_factory,
    roclip_small_image_factory,
)
from roclip_plugin.config import RoClipConfig
from roclip_plugin.hookspecs import hookimpl
from roclip_plugin.matching import Matcher, make_matcher
from roclip_plugin.risk import builtin_scorer_factories
from roclip_plugin.schedule import ScheduleState, is_matching_unit


@hookimpl(trylast=True)
def roclip_make_matcher(config: RoClipConfig) -> Matcher:
    """The matcher ``config.matcher`` names."""
    return make_matcher(config)


@hookimpl(trylast=True)
def roclip_should_match(
    unit: int, total_units: int | None, config: RoClipConfig, state: ScheduleState
) -> bool:
    """The schedule ``config.schedule`` describes."""
    return is_matching_unit(unit, config, total_units=total_units, state=state)


@hookimpl(tryfirst=True)
def roclip_register_augmentations(register: Callable[..., None]) -> None:
    """``none`` for both kinds; ``roclip``, ``roclip-small``, ``roclip-light`` for images; ``eda``.

    ``tryfirst`` so that defaults are in place before plugins, which may then replace them.
    Building ``roclip`` imports torchvision and Pillow; registering it does not.
    """
    register("image", "none", identity_factory)
    register("text", "none", identity_factory)
    register("image", "roclip", roclip_image_factory)
    register("image", "roclip-small", roclip_small_image_factory)
    register("image", "roclip-light", roclip_light_image_factory)
    register("text", "eda", eda_factory)


@hookimpl(tryfirst=True)
def roclip_register_risk_scorers(register: Callable[..., None]) -> None:
    """``margin``, ``cosine``, ``history`` and ``density`` (docs/risk.md).

    ``tryfirst`` so the built-ins are in place before plugins, which may replace them.
    """
    for name, factory in builtin_scorer_factories().items():
        register(name, factory)
