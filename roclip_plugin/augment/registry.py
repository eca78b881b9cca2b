"""The augmentation registry: names to factories, per kind, filled through a hook.

The core owns names, duplicates and errors; plugins only call ``register`` from their
``roclip_register_augmentations`` hook. The built-ins are ``none`` (the identity) for both
kinds, ``roclip``, ``roclip-small`` and ``roclip-light`` for images and ``eda`` for texts
(docs/augmentation.md).

:func:`collect_augmentations` fills a registry from a plugin manager it is *given*: the plugin
manager imports the built-in plugin, which imports this package, so importing the manager here
would close an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy

KINDS = ("image", "text")
Factory = Callable[[Any], Callable[..., Any]]


def identity(x: Any) -> Any:
    """Return ``x`` unchanged (the ``none`` augmentation); module level so it pickles."""
    return x


def identity_factory(config: Any) -> Callable[[Any], Any]:
    """Factory of the ``none`` augmentation."""
    return identity


class AugmentationRegistry:
    """Name -> factory, per kind."""

    def __init__(self) -> None:
        self._factories: dict[str, dict[str, Factory]] = {kind: {} for kind in KINDS}

    def register(self, kind: str, name: str, factory: Factory, replace: bool = False) -> None:
        """Add ``factory`` under ``name``; a taken name needs ``replace=True``."""
        if kind not in KINDS:
            raise ValueError(f"augmentation kind {kind!r} is unknown; allowed: {', '.join(KINDS)}")
        if not name or not isinstance(name, str):
            raise ValueError(f"augmentation name must be a non-empty string, got {name!r}")
        if name in self._factories[kind] and not replace:
            raise ValueError(
                f"{kind} augmentation {name!r} is already registered; pass replace=True to "
                "override it"
            )
        self._factories[kind][name] = factory

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``, sorted."""
        return sorted(self._factories[kind])

    def build(self, kind: str, name: str, config: Any) -> Callable[..., Any]:
        """Instantiate the augmentation ``name`` of ``kind`` for ``config``."""
        try:
            factory = self._factories[kind][name]
        except KeyError:
            raise ValueError(
                f"--roclip-{kind}-aug: unknown {kind} augmentation {name!r}; registered: "
                f"{', '.join(self.names(kind)) or 'none'}"
            ) from None
        return factory(config)


def collect_augmentations(pm: pluggy.PluginManager) -> AugmentationRegistry:
    """Run ``roclip_register_augmentations`` on every plugin of ``pm`` into a fresh registry."""
    registry = AugmentationRegistry()
    pm.hook.roclip_register_augmentations(register=registry.register)
    return registry
