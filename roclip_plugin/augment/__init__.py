"""Augmentation, the one public face integrations import: the policy, the registry, the built-ins.

RoCLIP augments both images and captions before they reach the model; which augmentation runs
is a registry name filled through the ``roclip_register_augmentations`` hook, and every random
draw is a hash of ``(seed, epoch, sample index)``, so an image or a caption is augmented the
same on any worker, rank or device. The package holds, one concern a module:

- :mod:`~roclip_plugin.augment.registry`: names to factories, filled from a plugin manager;
- :mod:`~roclip_plugin.augment.policy`: :func:`build_policy` and what integrations call;
- :mod:`~roclip_plugin.augment.image`: the authors' image set, per sample and batched;
- :mod:`~roclip_plugin.augment.text`: EDA's four caption operations;
- :mod:`~roclip_plugin.augment.keys`: the per-sample keys;
- :mod:`~roclip_plugin.augment.synonyms`: WordNet synonym sources and the shipped table.

Nothing here imports the plugin manager (it imports this package through the built-in
plugin): :func:`build_policy` and :func:`collect_augmentations` take the manager they fill
from. See docs/augmentation.md.
"""

from roclip_plugin.augment.image import (
    RoClipImageAugment,
    roclip_image_factory,
    roclip_light_image_factory,
    roclip_small_image_factory,
)
from roclip_plugin.augment.keys import IndexedDataset, sample_index
from roclip_plugin.augment.policy import (
    AugmentationPolicy,
    AugmentedImageTransform,
    AugmentingTokenizer,
    accepted_kwargs,
    build_policy,
    check_policy_names,
    preprocess_size,
    warn_unresolved_stop,
)
from roclip_plugin.augment.registry import (
    AugmentationRegistry,
    collect_augmentations,
    identity,
    identity_factory,
)
from roclip_plugin.augment.text import Eda, eda_factory

__all__ = [
    "AugmentationPolicy",
    "AugmentationRegistry",
    "AugmentedImageTransform",
    "AugmentingTokenizer",
    "Eda",
    "IndexedDataset",
    "RoClipImageAugment",
    "accepted_kwargs",
    "build_policy",
    "check_policy_names",
    "collect_augmentations",
    "eda_factory",
    "identity",
    "identity_factory",
    "preprocess_size",
    "roclip_image_factory",
    "roclip_light_image_factory",
    "roclip_small_image_factory",
    "sample_index",
    "warn_unresolved_stop",
]
