"""The augmentation policy: what integrations call, built from the plugins' registry.

:func:`build_policy` turns a configuration into an :class:`AugmentationPolicy`: the CPU
transform for DataLoader workers, the batched path for GPUs, caption augmentation and a
tokenizer wrapper, all drawing per-sample randomness from ``(seed, epoch, index)``
(:mod:`roclip_plugin.augment.keys`). The registry it builds from is filled from the plugin
manager the caller gives it (:func:`~roclip_plugin.augment.registry.collect_augmentations`):
this package never imports the plugin manager, which imports it (through the built-ins).
"""

from __future__ import annotations

import inspect
import random
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from roclip_plugin.augment.keys import (
    STREAM_IMAGE,
    STREAM_TEXT,
    EpochCell,
    KeyMaker,
    python_seed,
)
from roclip_plugin.augment.registry import collect_augmentations, identity
from roclip_plugin.augment.text import strip_special_tokens
from roclip_plugin.config import RoClipConfig

if TYPE_CHECKING:
    import pluggy

IMAGE_KWARGS = ("key", "size", "rng")
TEXT_KWARGS = ("key", "rng")


def accepted_kwargs(fn: Callable[..., Any], names: Sequence[str]) -> tuple[str, ...]:
    """Which of ``names`` ``fn`` accepts as keywords (all of them if it takes ``**kwargs``).

    Plugins' augmentations may take only the image or caption, or also ``rng`` (a generator
    seeded for the sample) and ``key`` (``(seed, epoch, index, stream)``), as pluggy lets hook
    implementations take any subset of a hook's arguments.
    """
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return tuple(names)
    taken = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return tuple(n for n in names if n in taken)


def _image_kwargs(
    accepted: Sequence[str], key: tuple[int, int, int, int], size: tuple[int, int] | None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if "key" in accepted:
        kwargs["key"] = key
    if "size" in accepted:
        kwargs["size"] = size
    if "rng" in accepted:
        kwargs["rng"] = torch.Generator().manual_seed(python_seed(*key))
    return kwargs


def _size_of(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    values = [int(v) for v in size]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def preprocess_size(preprocess: Any) -> tuple[int, int] | None:
    """The output size of a torchvision-style ``Compose``: its last crop or resize ``size``.

    Used as the size of the augmentation's resized crop, so that the model's own resize and
    centre crop then leave the augmented image whole.
    """
    for transform in reversed(list(getattr(preprocess, "transforms", []))):
        size = getattr(transform, "size", None)
        if isinstance(size, int) or (
            isinstance(size, (tuple, list)) and size and all(isinstance(v, int) for v in size)
        ):
            return _size_of(size)
    return None


class AugmentedImageTransform:
    """``preprocess(augment(image))``: the image augmentation before the model's preprocessing.

    A drop-in for a dataset's transform (``transform(image)``); a dataset that knows the sample
    index may pass it (``transform(image, index=i)``), or wrap itself in
    :class:`~roclip_plugin.augment.keys.IndexedDataset`. Picklable when ``preprocess`` is.
    Other attributes (``transforms`` of a ``Compose`` ...) are the preprocessing's, as the
    tokenizer wrapper's are the tokenizer's: code that inspects its transform (OpenCLIP's
    synthetic dataset reads ``transforms[0].size``) keeps working.

    Args:
        policy: the policy whose augmentation, seed and epoch are used.
        preprocess: the model's transform (resize, crop, to tensor, normalise), or None.
        size: ``(height, width)`` of the augmented image; default: ``preprocess``'s size, or
            224.
    """

    def __init__(
        self,
        policy: AugmentationPolicy,
        preprocess: Callable[[Any], Any] | None = None,
        size: int | Sequence[int] | None = None,
    ) -> None:
        self.policy = policy
        self.preprocess = preprocess
        self.size = _size_of(size) or preprocess_size(preprocess) or (224, 224)

    def __repr__(self) -> str:
        return (
            f"AugmentedImageTransform(augment={self.policy.image_name!r}, size={self.size}, "
            f"preprocess={self.preprocess!r})"
        )

    def __getattr__(self, name: str) -> Any:
        if name in ("policy", "preprocess", "size"):  # during unpickling, before __dict__ is set
            raise AttributeError(name)
        if self.preprocess is None:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r} (and no preprocessing)"
            )
        return getattr(self.preprocess, name)

    def __call__(self, image: Any, index: int | None = None) -> Any:
        """Augment ``image`` (sample ``index`` if known), then apply the preprocessing."""
        image = self.policy.augment_image(image, index=index, size=self.size)
        return image if self.preprocess is None else self.preprocess(image)


class AugmentationPolicy:
    """The configured image and text augmentations, with their per-sample randomness.

    Build it with :func:`build_policy`. It is picklable (for DataLoader workers, ``fork`` or
    ``spawn``) and every transform or tokenizer it makes shares its epoch: call
    :meth:`set_epoch` in the main process before each epoch and even persistent workers see it.

    Args:
        image: the image augmentation (from the registry).
        text: the text augmentation (from the registry).
        seed: the run's seed.
        image_refresh: ``epoch`` (new draws each epoch) or ``run`` (fixed for the run).
        text_refresh: the same for captions.
        image_stop_epoch: from this epoch on images pass unaugmented (None: never).
        image_name: registry name, for messages.
        text_name: registry name, for messages.
    """

    def __init__(
        self,
        image: Callable[..., Any] = identity,
        text: Callable[..., Any] = identity,
        *,
        seed: int = 0,
        image_refresh: str = "epoch",
        text_refresh: str = "epoch",
        image_name: str = "custom",
        text_name: str = "custom",
        image_stop_epoch: int | None = None,
    ) -> None:
        self.image = image
        self.image_stop_epoch = image_stop_epoch
        self.text_augment = text
        self.image_name = image_name
        self.text_name = text_name
        self.epoch_cell = EpochCell()
        self.image_keys = KeyMaker(seed, image_refresh, STREAM_IMAGE, self.epoch_cell)
        self.text_keys = KeyMaker(seed, text_refresh, STREAM_TEXT, self.epoch_cell)
        self._image_kwargs = accepted_kwargs(image, IMAGE_KWARGS)
        self._text_kwargs = accepted_kwargs(text, TEXT_KWARGS)

    def __repr__(self) -> str:
        return (
            f"AugmentationPolicy(image={self.image_name!r}, text={self.text_name!r}, "
            f"seed={self.image_keys.seed}, image_refresh={self.image_keys.refresh!r}, "
            f"text_refresh={self.text_keys.refresh!r}, "
            f"image_stop_epoch={self.image_stop_epoch!r})"
        )

    # -- epoch ---------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The current epoch (shared with every worker)."""
        return self.epoch_cell.get()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch before iterating its DataLoader (as ``DistributedSampler.set_epoch``)."""
        self.epoch_cell.set(epoch)

    # -- images --------------------------------------------------------------------------------

    def images_augmented(self, epoch: int | None = None) -> bool:
        """Whether images of ``epoch`` (default: the current one) are augmented at all.

        False for the identity, and from ``image_stop_epoch`` on: the epoch is the training
        epoch, not the key's (under ``run`` refresh keys all read epoch 0).
        """
        if self.image is identity:
            return False
        current = self.epoch if epoch is None else epoch
        return self.image_stop_epoch is None or current < self.image_stop_epoch

    def image_transform(
        self,
        preprocess: Callable[[Any], Any] | None = None,
        size: int | Sequence[int] | None = None,
    ) -> AugmentedImageTransform:
        """The CPU path: a transform that augments, then applies ``preprocess``."""
        return AugmentedImageTransform(self, preprocess, size)

    def augment_image(
        self,
        image: Any,
        index: int | None = None,
        epoch: int | None = None,
        size: int | Sequence[int] | None = None,
    ) -> Any:
        """Augment one image (PIL, or ``[C, H, W]`` tensor) without any preprocessing."""
        if not self.images_augmented(epoch):
            return image
        key = self.image_keys.key(index, epoch)
        return self.image(image, **_image_kwargs(self._image_kwargs, key, _size_of(size)))

    def gpu_batch(
        self,
        images: torch.Tensor,
        epoch: int | None = None,
        indices: torch.Tensor | Sequence[int] | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """The batched path: augment ``[B, 3, H, W]`` images on their device.

        Args:
            images: float in [0, 1], uint8, or normalised with ``mean`` and ``std`` (then the
                result is normalised the same way). The size is kept.
            epoch: defaults to the policy's current epoch.
            indices: the samples' dataset indices (reproducible keys); default: a counter.
            mean: per-channel normalisation mean of ``images``, if normalised.
            std: per-channel normalisation std of ``images``, if normalised.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] images, got shape {tuple(images.shape)}")
        if not self.images_augmented(epoch) or images.shape[0] == 0:
            return images
        seed, ep, index_tensor, stream = self.image_keys.batch(images.shape[0], indices, epoch)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither")
        if mean is not None and std is not None:
            m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = x * s + m
        x = x.clamp(0.0, 1.0)
        batch_fn = getattr(self.image, "batch", None)
        if batch_fn is not None:
            x = batch_fn(x, (seed, ep, index_tensor, stream))
        else:
            x = self._batch_by_sample(x, (seed, ep, index_tensor, stream))
        if mean is not None and std is not None:
            x = (x - m) / s
        if images.dtype == torch.uint8:
            return (x * 255.0).round().clamp(0, 255).to(torch.uint8)
        return x.to(images.dtype)

    def _batch_by_sample(
        self, x: torch.Tensor, key: tuple[int, int, torch.Tensor, int]
    ) -> torch.Tensor:
        """Fallback for augmentations without a ``batch`` method: one call per image."""
        _warn_once(
            f"image augmentation {self.image_name!r} has no batch method; gpu_batch calls it "
            "once per image"
        )
        seed, epoch, indices, stream = key
        size = (x.shape[-2], x.shape[-1])
        out = [
            self.image(
                img, **_image_kwargs(self._image_kwargs, (seed, epoch, int(i), stream), size)
            )
            for img, i in zip(x, indices.tolist(), strict=True)
        ]
        return torch.stack(out)

    # -- texts ---------------------------------------------------------------------------------

    def text(self, caption: str, epoch: int | None = None, index: int | None = None) -> str:
        """Augment one caption: special strings removed, then the text augmentation.

        A caption with at least one word never comes back empty (the cleaned caption is
        returned if an augmentation empties it); one with no word comes back cleaned.
        """
        return self._text(caption, self.text_keys.key(index, epoch))

    def texts(
        self,
        captions: Sequence[str],
        epoch: int | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[str]:
        """Augment several captions.

        Without ``indices``, a single caption uses the current sample index and several use
        consecutive counter values.
        """
        keys = self.text_keys.keys(len(captions), indices, epoch)
        return [self._text(c, k) for c, k in zip(captions, keys, strict=True)]

    def _text(self, caption: str, key: tuple[int, int, int, int]) -> str:
        if not isinstance(caption, str):
            raise TypeError(f"captions must be str, got {type(caption).__name__}")
        cleaned = strip_special_tokens(caption)
        if self.text_augment is identity or not cleaned.strip():
            return cleaned
        kwargs: dict[str, Any] = {}
        if "key" in self._text_kwargs:
            kwargs["key"] = key
        if "rng" in self._text_kwargs:
            kwargs["rng"] = random.Random(python_seed(*key))
        out = self.text_augment(cleaned, **kwargs)
        if not isinstance(out, str):
            raise TypeError(
                f"text augmentation {self.text_name!r} returned {type(out).__name__}, not str"
            )
        out = strip_special_tokens(out)
        return out if out.strip() else cleaned

    def tokenizer(self, tokenizer: Callable[..., Any]) -> AugmentingTokenizer:
        """Wrap a tokenizer so that it augments captions before tokenizing them."""
        return AugmentingTokenizer(tokenizer, self)


class AugmentingTokenizer:
    """A tokenizer that augments captions first, for trainers that tokenize in the loader.

    Same call as OpenCLIP's tokenizers, ``tokenizer(texts, context_length=None)``, plus an
    optional ``indices`` (the samples' dataset indices). Without them one caption uses the
    index set by :class:`~roclip_plugin.augment.keys.IndexedDataset`, else a per-call counter
    (reproducible only for a fixed number of workers and ranks). The epoch is the policy's
    (:meth:`set_epoch`, shared with workers). Other attributes (``context_length``,
    ``vocab_size`` ...) are the wrapped tokenizer's. Picklable when the tokenizer is.
    """

    def __init__(self, tokenizer: Callable[..., Any], policy: AugmentationPolicy) -> None:
        self.tokenizer = tokenizer
        self.policy = policy

    def __repr__(self) -> str:
        return f"AugmentingTokenizer({self.tokenizer!r}, {self.policy!r})"

    def __getattr__(self, name: str) -> Any:
        if name in ("tokenizer", "policy"):  # during unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    @property
    def epoch(self) -> int:
        """The policy's current epoch."""
        return self.policy.epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the policy's epoch (seen by every worker)."""
        self.policy.set_epoch(epoch)

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        *,
        indices: Sequence[int] | None = None,
    ) -> Any:
        """Augment ``texts`` and tokenize them with the wrapped tokenizer."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        augmented = self.policy.texts(batch, indices=indices)
        if context_length is None:
            return self.tokenizer(augmented)
        return self.tokenizer(augmented, context_length=context_length)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def warn_unresolved_stop(config: RoClipConfig, total_epochs: int | None) -> None:
    """Warn once where a stop fraction cannot resolve: no run length, so no stop epoch."""
    if config.image_aug_stop_fraction is not None and total_epochs is None:
        _warn_once(
            "--roclip-image-aug-stop-fraction needs the run length: images are augmented in "
            "every epoch; pass total_epochs (or use --roclip-image-aug-stop-epoch)"
        )


def build_policy(
    config: RoClipConfig | None,
    pm: pluggy.PluginManager,
    total_epochs: int | None = None,
    *,
    warn: bool = True,
) -> AugmentationPolicy:
    """The augmentation policy a configuration names, from the registry ``pm``'s plugins fill.

    The plugin manager is an argument, not built here: it imports the built-in plugin, which
    imports this package, and the caller already holds the one its own plugins are in.

    Args:
        config: a :class:`~roclip_plugin.config.RoClipConfig`; None: the default preset.
        pm: the plugin manager (:func:`roclip_plugin.get_plugin_manager`, or the defense's).
        total_epochs: the run length, which ``--roclip-image-aug-stop-fraction`` needs (without
            it images are augmented every epoch, with a warning naming the fix).
        warn: give that warning here; False for a caller that may learn the run length later
            and warns itself (:func:`warn_unresolved_stop` when training starts without it).

    Raises:
        ValueError: an unknown augmentation name (naming ``--roclip-image-aug`` or
            ``--roclip-text-aug`` and the registered names) or synonym source.
        ImportError: ``roclip`` images without torchvision and Pillow.
    """
    config = RoClipConfig() if config is None else config
    registry = collect_augmentations(pm)
    if warn:
        warn_unresolved_stop(config, total_epochs)
    return AugmentationPolicy(
        registry.build("image", config.image_aug, config),
        registry.build("text", config.text_aug, config),
        seed=config.seed,
        image_refresh=config.image_aug_refresh,
        image_stop_epoch=config.resolved_image_aug_stop(total_epochs),
        text_refresh=config.text_aug_refresh,
        image_name=config.image_aug,
        text_name=config.text_aug,
    )


def check_policy_names(config: RoClipConfig | None, pm: pluggy.PluginManager) -> None:
    """Refuse what :func:`build_policy` would refuse, without building the image augmentation.

    For commands that list the augmentation flags but need only the core (``roclip smoke``)
    or check everything before long work (``roclip demo``): the image augmentation's name is
    checked against the registry (building ``roclip`` would need torchvision), the text
    augmentation is built (EDA is pure Python; this checks its synonym source, e.g.
    ``--roclip-eda-synonyms nltk`` without NLTK). ``pm`` as for :func:`build_policy`.
    """
    config = RoClipConfig() if config is None else config
    registry = collect_augmentations(pm)
    if config.image_aug not in registry.names("image"):
        registry.build("image", config.image_aug, config)  # raises, naming the flag
    registry.build("text", config.text_aug, config)
