"""RoCLIP for the sigmoid loss of SigLIP (OpenCLIP's ``--siglip``).

Plain steps compute exactly OpenCLIP's ``SigLipLoss``: every rank scores its images against its
own captions (positives on the diagonal, negatives elsewhere) and then against each other
rank's captions (negatives only), which reach it as OpenCLIP's ``--loss-dist-impl`` says:
``bidir`` (the default) and ``shift`` pass blocks around the ring, ``reduce`` and ``gather``
use collectives; the gradient of every block flows back to the rank that owns it. The same
operations in the same order give the same values and gradients as OpenCLIP's.

Matching steps use the same loss with each image's matched pool caption in place of its own
(:class:`RoClipSigLipLoss`; the plan of each step, pool, statistics and accumulation are the
defense's, the plan's actions :class:`~roclip_plugin.loss.RoClipLoss`'s). Matched captions are
constants, so the text tower stays in the graph with a zero gradient and the learnable bias
keeps training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F

from roclip_plugin.contrastive import CaptionIds, DistInfo, duplicate_pairs
from roclip_plugin.loss import RoClipLoss

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def check_dist_impl(dist_impl: str | None) -> str:
    """The distributed implementation to use (None: ``bidir``, as OpenCLIP); refuses others."""
    impl = dist_impl or "bidir"
    if impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(
            f"DistInfo.dist_impl (OpenCLIP's --loss-dist-impl): invalid value {dist_impl!r}; "
            f"allowed: {', '.join(SIGLIP_DIST_IMPLS)}"
        )
    return impl


# -- point-to-point exchanges with gradients ---------------------------------------------------


def _exchange(source: int, target: int, tensor: torch.Tensor) -> torch.Tensor:
    """Send ``tensor`` to rank ``target``; return the same-shaped tensor rank ``source`` sent."""
    received = torch.zeros_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), target),
        dist.P2POp(dist.irecv, received, source),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _exchange_both_ways(
    left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send to both neighbours at once; returns ``(from_right, from_left)``."""
    from_left, from_right = torch.zeros_like(to_right), torch.zeros_like(to_left)
    ops = [
        dist.P2POp(dist.isend, to_right.contiguous(), right),
        dist.P2POp(dist.isend, to_left.contiguous(), left),
        dist.P2POp(dist.irecv, from_right, right),
        dist.P2POp(dist.irecv, from_left, left),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return from_right, from_left


class _Exchange(torch.autograd.Function):
    """:func:`_exchange` whose backward returns the gradient to the rank that sent the block."""

    @staticmethod
    def forward(ctx: Any, source: int, target: int, tensor: torch.Tensor) -> torch.Tensor:
        ctx.source, ctx.target = source, target
        return _exchange(source, target, tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, _Exchange.apply(ctx.target, ctx.source, grad.contiguous())


class _ExchangeBothWays(torch.autograd.Function):
    """:func:`_exchange_both_ways` with gradients sent back the way the blocks came."""

    @staticmethod
    def forward(
        ctx: Any, left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.left, ctx.right = left, right
        return _exchange_both_ways(left, right, to_left, to_right)

    @staticmethod
    def backward(ctx: Any, grad_right: torch.Tensor, grad_left: torch.Tensor) -> tuple[Any, ...]:
        # The roles swap: what came from the right goes back to the right, and so on.
        grads = _ExchangeBothWays.apply(
            ctx.right, ctx.left, grad_right.contiguous(), grad_left.contiguous()
        )
        return (None, None, *grads)


# -- the loss ------------------------------------------------------------------------------------


class _SigmoidBlocks:
    """Sums the sigmoid terms of one rank's images, block of captions by block.

    Also keeps, per image, the largest logit of any other caption, for the in-batch retrieval
    accuracy: an image counts as retrieved when no other caption of the global batch scores
    higher than its own (the bias shifts every logit alike, so this is the cosine ranking).
    """

    def __init__(
        self,
        image_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        caption_ids: CaptionIds | None,
    ) -> None:
        self.image = image_features
        self.scale = logit_scale
        self.bias = logit_bias
        self.ids = caption_ids
        self.own_logit: torch.Tensor | None = None
        self.best_other: torch.Tensor | None = None

    def own(self, text_features: torch.Tensor) -> torch.Tensor:
        """The block of the rank's own captions: the diagonal is positive."""
        logits = self._logits(text_features)
        rows = torch.arange(logits.shape[0], device=logits.device)
        exclude = None
        if self.ids is not None:
            exclude = duplicate_pairs(self.ids.local, self.ids.local, rows)
        with torch.no_grad():
            self.own_logit = logits.diagonal().clone()
            others = logits.detach().clone()
            others[rows, rows] = float("-inf")
            self.best_other = others.amax(dim=1)
        labels = -torch.ones(logits.shape, device=logits.device, dtype=self.image.dtype)
        labels = 2 * torch.eye(*logits.shape, device=logits.device, dtype=self.image.dtype) + labels
        return self._sum(labels * logits, exclude)

    def other(
        self, text_features: torch.Tensor, source: int, *, track: bool = True
    ) -> torch.Tensor:
        """A block of rank ``source``'s captions: every pair is negative."""
        logits = self._logits(text_features)
        exclude = None
        if self.ids is not None:
            rows = text_features.shape[0]
            block = self.ids.all[source * rows : (source + 1) * rows]
            exclude = duplicate_pairs(self.ids.local, block, None)
        if track and self.best_other is not None:
            self.best_other = torch.maximum(self.best_other, logits.detach().amax(dim=1))
        labels = -torch.ones(logits.shape, device=logits.device, dtype=self.image.dtype)
        return self._sum(labels * logits, exclude)

    def accuracy(self) -> torch.Tensor:
        """Share of this rank's images whose own caption scores highest (0-dim, detached)."""
        assert self.own_logit is not None and self.best_other is not None
        return (self.own_logit >= self.best_other).float().mean()

    def _logits(self, text_features: torch.Tensor) -> torch.Tensor:
        logits = self.scale * self.image @ text_features.T
        if self.bias is not None:
            logits = logits + self.bias
        return logits

    def _sum(self, signed_logits: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
        terms = F.logsigmoid(signed_logits)
        if exclude is not None:
            terms = terms.masked_fill(exclude, 0.0)
        return -terms.sum() / self.image.shape[0]


def _bidir(blocks: _SigmoidBlocks, text: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """OpenCLIP's ``bidir``: blocks travel both ways round the ring, half the hops each."""
    rank, world = info.rank, info.world_size
    left, right = (rank - 1) % world, (rank + 1) % world
    loss = blocks.own(text)
    to_left = to_right = text
    pairs, rest = divmod(world - 1, 2)
    for hop in range(1, pairs + 1):
        from_right, from_left = _ExchangeBothWays.apply(left, right, to_left, to_right)
        loss = loss + blocks.other(from_right, (rank + hop) % world)
        loss = loss + blocks.other(from_left, (rank - hop) % world)
        to_left, to_right = from_right, from_left
    if rest:
        from_left = _Exchange.apply(left, right, to_right)
        loss = loss + blocks.other(from_left, (rank - pairs - 1) % world)
    return loss


def _shift(blocks: _SigmoidBlocks, text: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """OpenCLIP's ``shift``: every block travels one way round the ring."""
    rank, world = info.rank, info.world_size
    left, right = (rank - 1) % world, (rank + 1) % world
    loss = blocks.own(text)
    to_right = text
    for hop in range(1, world):
        from_left = _Exchange.apply(left, right, to_right)
        loss = loss + blocks.other(from_left, (rank - hop) % world)
        to_right = from_left
    return loss


def _reduce(blocks: _SigmoidBlocks, text: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """OpenCLIP's ``reduce``: rank i's block reaches everyone through a summed all-reduce.

    The rank's own block is scored too and multiplied by 0, as OpenCLIP does: it keeps every
    all-reduce in every rank's graph, so the backward's collectives run on all ranks.
    """
    loss = blocks.own(text)
    for source in range(info.world_size):
        mine = info.rank == source
        received = torch.distributed.nn.all_reduce(text * mine, dist.ReduceOp.SUM)
        loss = loss + float(not mine) * blocks.other(received, source, track=not mine)
    return loss


def _gather(blocks: _SigmoidBlocks, text: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """OpenCLIP's ``gather``: one differentiable all-gather of every rank's block."""
    loss = blocks.own(text)
    every = torch.distributed.nn.all_gather(text)
    for source in range(info.world_size):
        mine = info.rank == source
        loss = loss + float(not mine) * blocks.other(every[source], source, track=not mine)
    return loss


_DIST_IMPLS: dict[str, Callable[[_SigmoidBlocks, torch.Tensor, DistInfo], torch.Tensor]] = {
    "bidir": _bidir,
    "shift": _shift,
    "reduce": _reduce,
    "gather": _gather,
}


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    info: DistInfo,
    *,
    caption_ids: CaptionIds | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's loss, as OpenCLIP's ``SigLipLoss``; returns ``(loss, retrieval accuracy)``.

    The loss of this rank: its images against the captions of every rank, summed and divided
    by the local batch size. With ``caption_ids`` (``duplicate_matches=mask``) a caption that
    several images were matched to is a positive of each of them and a negative of none: the
    pairs it would otherwise make with the others weigh 0.
    """
    blocks = _SigmoidBlocks(image_features, logit_scale, logit_bias, caption_ids)
    if info.world_size == 1:
        loss = blocks.own(text_features)
    else:
        loss = _DIST_IMPLS[check_dist_impl(info.dist_impl)](blocks, text_features, info)
    return loss, blocks.accuracy()


class RoClipSigLipLoss(RoClipLoss):
    """SigLIP's loss under a step plan; a drop-in for OpenCLIP's ``SigLipLoss`` without one.

    Takes :class:`~roclip_plugin.loss.RoClipLoss`'s argument; ``info.dist_impl`` selects
    OpenCLIP's distributed implementation (``--loss-dist-impl``; ``local_loss`` and
    ``gather_with_grad`` do not apply to SigLIP). ``forward`` takes what
    ``SigLipLoss.forward`` does, plus the plan; the bias may be None for a model without one.
    """

    gathers_matched = False  # each block of matched captions travels as the loss needs it
    # The sigmoid blocks take no per-pair weights: a drop leaves the risky rows out of the
    # local batch instead, and weight and unimodal are refused (check_action_supported).
    weighted_objective = False

    def __init__(self, info: DistInfo | None = None, *legacy_args: Any, **legacy: Any) -> None:
        super().__init__(info, *legacy_args, **legacy)
        check_dist_impl(self.info.dist_impl)

    def objective(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        *,
        all_text: torch.Tensor | None = None,
        caption_ids: CaptionIds | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sigmoid loss; ``all_text`` is unused (captions travel block by block)."""
        return sigmoid_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            self.info,
            caption_ids=caption_ids,
        )
