"""Deprecated name of :mod:`roclip_plugin.smoke`, the ``roclip smoke`` demonstration.

The module was named for the command it serves only after ``roclip demo`` (the attack kit's
real-data loop) existed; importing it here still works and says where it went.
"""

from __future__ import annotations

import warnings
from typing import Any

from roclip_plugin import smoke

warnings.warn(
    "roclip_plugin.demo is now roclip_plugin.smoke; import it from there",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`roclip_plugin.smoke`, as before the move."""
    return getattr(smoke, name)
