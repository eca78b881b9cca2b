"""RoClipAdapter: RoCLIP in any PyTorch training loop, in a handful of lines.

The adapter is a thin layer over :class:`roclip_plugin.RoClipDefense` (which holds all of the
method: pool, schedule, matching, loss, hooks, state). What it adds is what an in-house loop
would otherwise write by hand: getting features out of the model (``encode_image`` /
``encode_text``, ``forward``, or callables), normalising them, exponentiating CLIP's stored
log temperature, computing the loss in float32 under autocast, putting its state into the
model's checkpoint, and collecting per-epoch matching statistics. It owns no optimiser and no
data loader.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import pluggy
import torch
import torch.nn.functional as F
from torch import nn

from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager
from roclip_plugin.augment import AugmentationPolicy, build_policy, warn_unresolved_stop
from roclip_plugin.config import add_argparse_args, config_from_namespace
from roclip_plugin.loss import DistInfo
from roclip_plugin.pool import CaptionPool
from roclip_plugin.stats import MatchStatsCollector, MatchSummary
from roclip_plugin.validation import as_real
from roclip_torch.features import (
    LogitScaleSource,
    as_scale_tensor,
    model_device,
    parse_model_output,
    read_logit_scale,
    unwrap,
    uses_forward,
)

CHECKPOINT_KEY = "roclip"
CLIP_MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100 (log: ln 100)

Encoder = Callable[[Any], torch.Tensor]


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    plugin_manager: pluggy.PluginManager | None = None,
) -> pluggy.PluginManager:
    """Add ``--roclip-preset``, every ``--roclip-*`` flag and plugins' own options to ``parser``.

    Returns the plugin manager that was asked for options: pass the same one to
    :meth:`RoClipAdapter.from_args`, so the plugins that added options also receive them.
    """
    pm = plugin_manager or get_plugin_manager()
    add_argparse_args(parser)
    pm.hook.roclip_add_options(parser=parser)
    return pm


class RoClipAdapter:
    """RoCLIP for one training run of an in-house PyTorch loop (one per process under DDP).

    Typical use (see docs/torch-loop.md)::

        adapter = RoClipAdapter(RoClipConfig(pool_size=65536), model=model,
                                total_epochs=epochs, steps_per_epoch=len(loader))
        for epoch in range(start, epochs):
            adapter.epoch_start(epoch)
            for images, texts in loader:
                loss = adapter.step(images, texts)   # or adapter.loss(img_f, txt_f, scale)
                ...
            torch.save(adapter.put_in_checkpoint({"model": model.state_dict()}), path)

    Features come, in order of preference, from ``encode_image``/``encode_text`` callables
    given here; else from ``model``: its ``forward`` when it is a DDP wrapper or has no
    encoders (``forward`` must return a dict with ``image_features``/``text_features``
    [/``logit_scale``] or a tuple ``(image, text[, logit_scale])``), otherwise its
    ``encode_image``/``encode_text``.

    Args:
        config: RoCLIP settings; the ``default`` preset when omitted.
        model: the model being trained (possibly DDP-wrapped). Gives features, the logit scale
            (attribute ``logit_scale``) and the device of the caption pool.
        encode_image: callable ``images -> features``, overriding the model's.
        encode_text: callable ``texts -> features``, overriding the model's.
        logit_scale: a tensor (e.g. the ``nn.Parameter``), a number, or a callable returning
            one; by default the model's ``logit_scale`` attribute. Used when features do not
            come with a scale (``encode_*`` paths, or ``loss(..., logit_scale=None)``).
        logit_scale_is_log: whether that source stores ``log(scale)`` as CLIP's parameter
            does (then it is exponentiated). A ``forward`` output's scale is always taken as
            already exponentiated (OpenCLIP's convention).
        siglip: train SigLIP's sigmoid loss (:class:`roclip_plugin.RoClipSigLipLoss`)
            instead of CLIP's softmax loss, for a SigLIP model (one with a learnable bias).
        logit_bias: with ``siglip``, the bias added to every logit: a tensor (the
            ``nn.Parameter``), a number, or a callable returning one; by default the model's
            ``logit_bias`` attribute, and no bias when the model has none. Never
            exponentiated. Ignored without ``siglip`` (the softmax loss does not change with
            a constant added to every logit).
        normalize: L2-normalise features before the loss. Idempotent (up to rounding) on
            features that are normalised already; turn off for bit-identical numbers with
            OpenCLIP's ``ClipLoss`` on pre-normalised features.
        loss_dtype: compute the loss in this dtype with autocast off (default float32: bf16
            logits scaled by up to 100 lose the softmax's precision); ``None`` keeps the
            features' dtype and the ambient autocast, as OpenCLIP does.
        total_epochs: run length, needed by ``ramp`` schedules and ``warmup_fraction``, and to
            warn when no matching epoch falls inside the run.
        steps_per_epoch: optimiser steps per epoch, needed with ``period_steps``.
        samples_per_epoch: the training set's rows over all ranks, to warn when the pool holds
            too large a share of them (images would meet their own earlier caption), and the
            per-sample history's size: give the dataset's length, not the batches' pairs
            (with ``drop_last`` row ids past those would share the first rows' slots).
        plugin_manager: hooks; :func:`roclip_plugin.get_plugin_manager` when omitted
            (entry-point plugins included).
        plugins: extra plugin objects to register before the defense is built (the defense
            decides at construction whether anyone observes ``roclip_after_match``).
        collect_stats: register the internal per-epoch statistics collector
            (:meth:`match_summary`). Reading statistics costs a GPU synchronisation per
            matching step, which the pool lookup already pays. A
            :class:`~roclip_plugin.stats.MatchStatsCollector` among ``plugins`` is used
            instead of a new one (one collector: a trainer that keeps suspicious rows or
            knows the poison manifest configures its own).
        dist_info: distributed set-up; read from the initialised process group when omitted
            (``DistInfo.from_env()``), set ``local_loss`` / ``gather_with_grad`` there.
        device: where the caption pool lives; by default the model's device, else the device
            of the first features seen.
        options: the loop's parsed arguments, passed to plugins' ``roclip_configure``.
    """

    def __init__(
        self,
        config: RoClipConfig | None = None,
        *,
        model: nn.Module | None = None,
        encode_image: Encoder | None = None,
        encode_text: Encoder | None = None,
        logit_scale: LogitScaleSource | None = None,
        logit_scale_is_log: bool = True,
        siglip: bool = False,
        logit_bias: LogitScaleSource | None = None,
        normalize: bool = True,
        loss_dtype: torch.dtype | None = torch.float32,
        total_epochs: int | None = None,
        steps_per_epoch: int | None = None,
        samples_per_epoch: int | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
        plugins: Sequence[object] = (),
        collect_stats: bool = True,
        dist_info: DistInfo | None = None,
        device: torch.device | str | None = None,
        options: argparse.Namespace | None = None,
    ) -> None:
        if (encode_image is None) != (encode_text is None):
            raise ValueError("RoClipAdapter: pass both encode_image and encode_text, or neither")
        self.config = config or RoClipConfig()
        self.model = model
        self.encode_image = encode_image
        self.encode_text = encode_text
        self.logit_scale_source = logit_scale
        self.logit_scale_is_log = logit_scale_is_log
        self.siglip = siglip
        self.logit_bias_source = logit_bias
        self.normalize = normalize
        self.loss_dtype = loss_dtype
        self.pm = plugin_manager or get_plugin_manager()
        self._augmentation: AugmentationPolicy | None = None
        self._epoch_started = False  # the loss warns once when epoch_start was never called
        self.stats = self._register_plugins(plugins, collect_stats)
        pool_device = device if device is not None else model_device(model)
        self.defense = RoClipDefense(
            self.config,
            plugin_manager=self.pm,
            options=options,
            device=pool_device,
            dist_info=dist_info,
            total_epochs=total_epochs,
            steps_per_epoch=steps_per_epoch,
            samples_per_epoch=samples_per_epoch,
            siglip=siglip,
        )

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, *, plugin_manager: pluggy.PluginManager, **kwargs: Any
    ) -> RoClipAdapter:
        """Build from flags added by :func:`add_arguments` (plugins receive ``args`` too)."""
        return cls(
            config_from_namespace(args), plugin_manager=plugin_manager, options=args, **kwargs
        )

    # -- state of the run ------------------------------------------------------------------

    @property
    def pool(self) -> CaptionPool:
        """The caption pool (read it; do not modify)."""
        return self.defense.pool

    @property
    def augmentation(self) -> AugmentationPolicy:
        """The configured augmentation policy (``--roclip-image-aug``, ``--roclip-text-aug``).

        Built on first use, so a loop that augments its own way never imports torchvision.
        Wrap the training set's transform and tokenizer with it
        (``policy.image_transform(preprocess)``, ``policy.tokenizer(tokenizer)``) or call
        ``policy.gpu_batch`` on the device; :meth:`epoch_start` keeps its epoch.
        """
        if self._augmentation is None:
            # the run length may come later (set_run_length): epoch_start warns if it never does
            self._augmentation = build_policy(
                self.config, self.pm, self.defense.total_epochs, warn=False
            )
            self._augmentation.set_epoch(max(self.defense.epoch, 0))
        return self._augmentation

    @property
    def matching(self) -> bool:
        """Whether the current step is a matching one."""
        return self.defense.matching

    @property
    def global_step(self) -> int:
        """Loss calls (optimiser steps) counted by the defense since the run began."""
        return self.defense.step

    @property
    def info(self) -> DistInfo:
        """The distributed set-up the defense uses."""
        return self.defense.info

    def set_run_length(
        self,
        total_epochs: int | None,
        steps_per_epoch: int | None,
        samples_per_epoch: int | None = None,
    ) -> None:
        """Tell the schedule the run length when it was unknown at construction.

        ``samples_per_epoch`` (the dataset's rows) also gives the per-sample history a slot
        per row if nothing has trained yet (:meth:`RoClipDefense.set_samples_per_epoch`).
        """
        self.defense.total_epochs = total_epochs
        self.defense.steps_per_epoch = steps_per_epoch
        if self._augmentation is not None:  # a stop fraction resolves against the new length
            stop = self.config.resolved_image_aug_stop(total_epochs)
            self._augmentation.image_stop_epoch = stop
        if samples_per_epoch is not None:  # sizes the per-sample history too, before use
            self.defense.set_samples_per_epoch(samples_per_epoch)

    # -- the three calls of a training loop --------------------------------------------------

    def epoch_start(self, epoch: int, *, step: int | None = None) -> bool:
        """Begin epoch ``epoch`` (0-based); returns whether it starts as a matching epoch.

        Args:
            epoch: the loop's 0-based epoch index.
            step: the loop's global optimiser step at this point, if it keeps one. A fresh
                defense (nothing trained, nothing restored) adopts it, so that a per-step
                schedule lines up in a run resumed from a checkpoint without RoCLIP state; a
                defense that disagrees after training or a restore gets a warning, because its
                state and the model's checkpoint then come from different points of the run.
        """
        if step is not None and step != self.defense.step:
            self._reconcile_step(step)
        if self.stats is not None:
            self.stats.reset()
        if self._augmentation is not None:
            warn_unresolved_stop(self.config, self.defense.total_epochs)
            self._augmentation.set_epoch(epoch)
        self._epoch_started = True
        return self.defense.start_epoch(epoch)

    def loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float | None = None,
        logit_bias: torch.Tensor | float | None = None,
        sample_ids: Any = None,
    ) -> torch.Tensor:
        """The step's RoCLIP loss; call it exactly once per optimiser step.

        Each call counts a step and updates the caption pool, so gradient accumulation must
        compute it once per optimiser step on the step's features, not once per micro-batch.

        Args:
            image_features: ``[batch, dim]`` image embeddings, any dtype and device.
            text_features: ``[batch, dim]`` caption embeddings of the same images.
            logit_scale: the *exponentiated* scale (as ``ClipLoss`` takes it); ``None`` reads
                the adapter's logit-scale source.
            logit_bias: with ``siglip``, the bias; ``None`` reads the adapter's bias source.
            sample_ids: stable ids of the rows (dataset row indices, or string keys such as
                a WebDataset ``__key__``), which the per-sample history
                (``--roclip-risk-score history``) is keyed by.
        """
        if not self._epoch_started:
            self._warn_no_epoch_start()
        scale = as_scale_tensor(
            self.current_logit_scale() if logit_scale is None else logit_scale, image_features
        )
        bias = self._bias_tensor(logit_bias, image_features)
        if self.loss_dtype is not None:
            scale = scale.to(self.loss_dtype)
            bias = None if bias is None else bias.to(self.loss_dtype)
        with self._loss_precision(image_features.device):
            img, txt = self._prepare(image_features), self._prepare(text_features)
            return self.defense.compute_loss(img, txt, scale, bias, sample_ids=sample_ids)

    def _warn_no_epoch_start(self) -> None:
        """Say once that the loop never called :meth:`epoch_start`.

        The schedule is asked there, so without it RoCLIP trains plain CLIP steps and never
        matches, silently.
        """
        self._epoch_started = True  # once
        warnings.warn(
            "RoClipAdapter: loss() was called before any epoch_start(): the schedule is asked "
            "at the start of each epoch, so RoCLIP never defends in this run; call "
            "adapter.epoch_start(epoch) at the start of every epoch (0-based)",
            RuntimeWarning,
            stacklevel=3,
        )

    def step(self, images: Any, texts: Any, sample_ids: Any = None) -> torch.Tensor:
        """Encode a batch through the model and return its loss (see :meth:`loss`)."""
        image_features, text_features, logit_scale = self.encode(images, texts)
        if sample_ids is None:
            return self.loss(image_features, text_features, logit_scale)
        return self.loss(image_features, text_features, logit_scale, sample_ids=sample_ids)

    def encode(self, images: Any, texts: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features and exponentiated logit scale of a batch, as :meth:`step` computes them."""
        scale: torch.Tensor | float | None = None
        if self.encode_image is not None and self.encode_text is not None:
            image_features, text_features = self.encode_image(images), self.encode_text(texts)
        elif self.model is None:
            raise ValueError(
                "RoClipAdapter.encode: no model and no encode_image/encode_text were given; "
                "compute features yourself and call adapter.loss(...)"
            )
        elif uses_forward(self.model):
            out = parse_model_output(self.model(images, texts))
            image_features, text_features = out.image_features, out.text_features
            scale = out.logit_scale
        else:
            inner = unwrap(self.model)
            image_features, text_features = inner.encode_image(images), inner.encode_text(texts)
        if scale is None:
            scale = self.current_logit_scale()
        return image_features, text_features, as_scale_tensor(scale, image_features)

    # -- the logit scale ---------------------------------------------------------------------

    def current_logit_scale(self) -> torch.Tensor | float:
        """The exponentiated logit scale from the configured source (with its gradient)."""
        value = read_logit_scale(self._logit_scale_source())
        if not self.logit_scale_is_log:
            return value
        return value.exp() if isinstance(value, torch.Tensor) else math.exp(value)

    def current_logit_bias(self) -> torch.Tensor | float | None:
        """The logit bias of a ``siglip`` adapter (with its gradient); None without one."""
        if not self.siglip:
            return None
        if self.logit_bias_source is not None:
            return read_logit_scale(self.logit_bias_source)
        inner = unwrap(self.model) if self.model is not None else None
        return getattr(inner, "logit_bias", None)

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = CLIP_MAX_LOGIT_SCALE) -> bool:
        """Clamp the trainable logit scale in place to ``[1, max_scale]``, as CLIP does.

        Call it after each optimiser step: without it the temperature can grow until the
        softmax saturates. Returns False when there is no tensor to clamp (a number, or a
        callable source).

        Raises:
            ValueError: ``max_scale`` is not a finite number >= 1 (the lower bound of the
                clamp; ``log(0)`` was a "math domain error").
        """
        number = as_real(max_scale)
        if number is None or not math.isfinite(number) or number < 1:
            raise ValueError(
                f"max_scale: invalid value {max_scale!r}; allowed: a finite number >= 1 (the "
                f"clamp's lower bound; CLIP uses {CLIP_MAX_LOGIT_SCALE:g})"
            )
        max_scale = number
        try:
            source = self._logit_scale_source()
        except ValueError:
            return False
        if not isinstance(source, torch.Tensor):
            return False
        if self.logit_scale_is_log:
            source.clamp_(0.0, math.log(max_scale))
        else:
            source.clamp_(1.0, max_scale)
        return True

    # -- statistics --------------------------------------------------------------------------

    def match_summary(self) -> MatchSummary:
        """Matching statistics since the last :meth:`epoch_start`, over every rank.

        A collective under ``torch.distributed``: call it on every rank.
        """
        if self.stats is None:
            raise RuntimeError("RoClipAdapter.match_summary: built with collect_stats=False")
        return self.stats.summary(self.info)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything RoCLIP needs for an exact resume (pool, schedule, counters)."""
        return self.defense.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.defense.load_state_dict(state)

    def put_in_checkpoint(self, checkpoint: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """Store :meth:`state_dict` under ``checkpoint["roclip"]``; returns ``checkpoint``."""
        checkpoint[CHECKPOINT_KEY] = self.state_dict()
        return checkpoint

    def load_from_checkpoint(self, checkpoint: Mapping[str, Any], *, strict: bool = True) -> bool:
        """Restore the state stored by :meth:`put_in_checkpoint`; returns whether there was one.

        Args:
            checkpoint: the loaded checkpoint dict.
            strict: raise ``KeyError`` when the checkpoint has no RoCLIP state; otherwise warn
                and continue with an empty pool (expected only when fine-tuning a checkpoint
                trained without RoCLIP).
        """
        if CHECKPOINT_KEY not in checkpoint:
            message = (
                f"checkpoint has no {CHECKPOINT_KEY!r} entry (keys: {sorted(checkpoint)}); it was "
                "not saved with adapter.put_in_checkpoint"
            )
            if strict:
                raise KeyError(message + "; pass strict=False to start with an empty pool")
            warnings.warn(message + "; starting with an empty caption pool", stacklevel=2)
            return False
        self.load_state_dict(checkpoint[CHECKPOINT_KEY])
        return True

    # -- internals ---------------------------------------------------------------------------

    def _register_plugins(
        self, plugins: Sequence[object], collect_stats: bool
    ) -> MatchStatsCollector | None:
        """Register ``plugins`` and the statistics collector, before the defense is built."""
        if any(isinstance(p, MatchStatsCollector) for p in self.pm.get_plugins()):
            # Hooks reach every plugin of a manager: two adapters on one manager would each
            # count the other's matching steps (and user plugins would see both runs).
            raise ValueError(
                "RoClipAdapter: this plugin manager already serves another adapter; give each "
                "adapter its own (roclip_plugin.get_plugin_manager() returns a new one)"
            )
        given = [p for p in plugins if isinstance(p, MatchStatsCollector)]
        if len(given) > 1:
            raise ValueError("RoClipAdapter: plugins hold more than one MatchStatsCollector")
        stats = given[0] if given else None  # the caller's (its top-k, its manifest) serves
        if stats is None and collect_stats:
            stats = MatchStatsCollector(self.config.suspicious_margin)
        for plugin in (*plugins, *([stats] if stats is not None and not given else [])):
            self.pm.register(plugin)
        return stats

    def _logit_scale_source(self) -> LogitScaleSource:
        if self.logit_scale_source is not None:
            return self.logit_scale_source
        inner = unwrap(self.model) if self.model is not None else None
        source = getattr(inner, "logit_scale", None)
        if source is None:
            raise ValueError(
                "RoClipAdapter: no logit scale: the model has no 'logit_scale' attribute and "
                "none was passed; give logit_scale= (tensor, number or callable)"
            )
        return source

    def _bias_tensor(
        self, value: torch.Tensor | float | None, like: torch.Tensor
    ) -> torch.Tensor | None:
        """The bias the loss adds, as a 0-dim tensor (None: no bias, or the softmax loss)."""
        if not self.siglip:
            return None
        value = self.current_logit_bias() if value is None else value
        return None if value is None else as_scale_tensor(value, like)

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        if self.loss_dtype is not None:
            features = features.to(self.loss_dtype)
        return F.normalize(features, dim=-1) if self.normalize else features

    @contextlib.contextmanager
    def _loss_precision(self, device: torch.device) -> Iterator[None]:
        if self.loss_dtype is None:
            yield
            return
        with torch.autocast(device_type=device.type, enabled=False):
            yield

    def _reconcile_step(self, step: int) -> None:
        fresh = self.defense.step == 0 and len(self.pool) == 0 and self.defense.unit is None
        if fresh:
            self.defense.set_step(step)
            return
        warnings.warn(
            f"RoClipAdapter.epoch_start: the loop is at global step {step} but the RoCLIP "
            f"state counted {self.defense.step} steps; was it restored from the same "
            "checkpoint as the model? Keeping the RoCLIP count.",
            RuntimeWarning,
            stacklevel=3,
        )
