"""The plugin manager: hook specs, built-in defaults, and third-party plugins.

Third-party plugins are found through the entry-point group ``roclip``
(``[project.entry-points.roclip] name = "module"``). Set ``ROCLIP_DISABLE_PLUGIN_AUTOLOAD=1``
to skip them (as ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` does for pytest), for example to rule a
plugin out while debugging. Nothing is loaded at import time.

The manager knows the hook specifications and the built-in plugin; what plugins register is
collected by whoever asks (:func:`roclip_plugin.augment.collect_augmentations`, kept importable
here as ``collect_augmentations``), so no module below this one imports it back.
"""

from __future__ import annotations

import os

import pluggy

from roclip_plugin import builtins, hookspecs
from roclip_plugin.augment import collect_augmentations

ENTRY_POINT_GROUP = "roclip"
AUTOLOAD_ENV = "ROCLIP_DISABLE_PLUGIN_AUTOLOAD"
BUILTINS_NAME = "roclip.builtins"


def get_plugin_manager(*, autoload: bool | None = None) -> pluggy.PluginManager:
    """A new manager with the specs, the built-in defaults and (unless disabled) entry points.

    Args:
        autoload: load the ``roclip`` entry-point group; ``None`` follows the environment
            variable ``ROCLIP_DISABLE_PLUGIN_AUTOLOAD`` (set to a non-empty value to disable).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtins, name=BUILTINS_NAME)
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    if autoload:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


__all__ = [
    "AUTOLOAD_ENV",
    "BUILTINS_NAME",
    "ENTRY_POINT_GROUP",
    "collect_augmentations",
    "get_plugin_manager",
]
