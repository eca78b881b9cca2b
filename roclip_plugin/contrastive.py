"""The pieces of CLIP's contrastive loss that every RoCLIP loss shares, as pure functions.

OpenCLIP's ``ClipLoss`` semantics (feature gathering, ``local_loss``, ``gather_with_grad``),
the statistics a matching step reports, and the unimodal nearest-neighbour terms of the risk
room's actions. :class:`~roclip_plugin.loss.RoClipLoss` (and the SigLIP loss) compose them; these
hold no state and import nothing of the defense, so they are tested, and reused by the kit's
tensor path, on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F

from roclip_plugin.distributed import all_gather_ints, all_gather_rows, rank_and_world_size


@dataclass(frozen=True)
class DistInfo:
    """How features are shared across processes (OpenCLIP's ``ClipLoss`` arguments)."""

    rank: int = 0
    world_size: int = 1
    local_loss: bool = False
    gather_with_grad: bool = False
    dist_impl: str | None = None  # SigLIP only: OpenCLIP's --loss-dist-impl (None: bidir)

    @classmethod
    def from_env(
        cls,
        *,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        dist_impl: str | None = None,
    ) -> DistInfo:
        """Rank and world size of the initialised process group, else a single process."""
        rank, world = rank_and_world_size()
        return cls(rank, world, local_loss, gather_with_grad, dist_impl)


@dataclass(frozen=True)
class MatchStats:
    """What one matching step saw, for the local batch of this rank.

    Attributes:
        epoch: 0-based epoch.
        step: global step counted by the defense (0-based).
        pool_fill: valid pool rows at lookup time.
        pool_size: pool capacity.
        matched_similarity: mean cosine similarity of each image to its matched caption.
        own_similarity: mean cosine similarity of each image to its own caption.
        margins: per local sample, ``matched - own`` similarity. A large margin means the
            image's own caption is far less similar than its best pool caption: a poison
            candidate. Detached, on the features' device.
        matched_indices: per local sample, the logical pool index matched.
        ids: per local sample, its stable sample id (None when the trainer gave none), so
            a collector can tie each margin to its row (:mod:`roclip_plugin.stats`).
    """

    epoch: int
    step: int
    pool_fill: int
    pool_size: int
    matched_similarity: float
    own_similarity: float
    margins: torch.Tensor
    matched_indices: torch.Tensor
    ids: torch.Tensor | None = None


@dataclass(frozen=True)
class RiskStats:
    """What one defended step's risk split decided, for the local batch of this rank.

    Attributes:
        epoch: 0-based epoch.
        step: global step counted by the defense (0-based).
        ids: stable sample ids of the rows (None when the data path gave none).
        risk: ``[batch]`` risks (higher is riskier), detached.
        risky: ``[batch]`` boolean, the rows judged risky.
        action: what was done to them (``match_action``).
    """

    epoch: int
    step: int
    ids: torch.Tensor | None
    risk: torch.Tensor
    risky: torch.Tensor
    action: str


def gather_features(
    features: torch.Tensor, info: DistInfo, *, keep_local_grad: bool = True
) -> torch.Tensor:
    """All-gather ``features`` in rank order, with OpenCLIP's gradient semantics.

    With ``gather_with_grad`` the gather is differentiable; otherwise the other ranks' rows are
    constants and, unless ``local_loss``, this rank's slice is the local tensor (with its grad).
    """
    if info.world_size == 1:
        return features
    if info.gather_with_grad:
        return torch.cat(torch.distributed.nn.all_gather(features), dim=0)
    parts = [torch.empty_like(features) for _ in range(info.world_size)]
    dist.all_gather(parts, features.detach().contiguous())
    if keep_local_grad and not info.local_loss:
        parts[info.rank] = features
    return torch.cat(parts, dim=0)


def check_batch_sizes(
    image_features: torch.Tensor, text_features: torch.Tensor, info: DistInfo
) -> None:
    """Refuse batches the gathers cannot take: image and text rows differ, or ranks differ.

    ``all_gather`` needs the same number of rows on every rank (gloo aborts the process,
    NCCL may read past the buffers); one all-gather of the row counts per step catches it and
    every rank raises the same error.
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"image_features has {image_features.shape[0]} rows but text_features has "
            f"{text_features.shape[0]}: give the loss one caption per image"
        )
    if info.world_size == 1:
        return
    sizes = all_gather_ints(image_features.shape[0])
    if len(set(sizes)) > 1:
        raise ValueError(
            f"local batch sizes differ across ranks: {sizes} (rank order). RoCLIP, like "
            "OpenCLIP's ClipLoss, all-gathers equally sized batches from every rank: drop the "
            "last incomplete batch (DataLoader(..., drop_last=True)) or give every rank the "
            "same batch size"
        )


@dataclass(frozen=True)
class CaptionIds:
    """Which caption each row of a matching step trains against; equal ids, same caption.

    A re-paired row carries its matched pool row (logical index, the same on every rank: the
    pool is), a row that kept its own caption a negative id unique in the global batch.

    Attributes:
        local: ``[batch]`` int64 ids of this rank's rows.
        all: ``[world_size * batch]`` ids of every rank's rows, in rank order.
    """

    local: torch.Tensor
    all: torch.Tensor


def caption_ids(indices: torch.Tensor, chosen: torch.Tensor | None, info: DistInfo) -> CaptionIds:
    """:class:`CaptionIds` of a matching step (one tiny all-gather under ``torch.distributed``).

    ``indices`` are the matched pool rows of the local images; ``chosen`` (partial matching)
    marks the rows that take them, the others keep their own caption and a unique id.
    """
    rows = indices.shape[0]
    own = -1 - (torch.arange(rows, device=indices.device) + info.rank * rows)
    local = indices.long() if chosen is None else torch.where(chosen, indices.long(), own)
    return CaptionIds(local, all_gather_rows(local, info.world_size))


def duplicate_pairs(
    row_ids: torch.Tensor, col_ids: torch.Tensor, positives: torch.Tensor | None
) -> torch.Tensor:
    """Boolean ``[rows, cols]`` mask of pairs that share a caption but are not the positive.

    ``positives`` holds each row's positive column (None: no positive in this block, as in
    SigLIP's blocks of other ranks' captions).
    """
    same = row_ids[:, None] == col_ids[None, :]
    if positives is not None:
        same[torch.arange(same.shape[0], device=same.device), positives] = False
    return same


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    info: DistInfo,
    *,
    all_image: torch.Tensor | None = None,
    all_text: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    caption_ids: CaptionIds | None = None,
    weights: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE, as OpenCLIP's ``ClipLoss``; returns ``(loss, logits_per_image)``.

    ``weights`` (``[world * batch]``, rank order) weigh each pair's two terms (a weighted mean
    over the rows the loss covers); ``excluded`` marks pairs that are no negative of any other
    pair either, which with weight 0 is the same as leaving them out of the batch, but keeps
    every rank's batch the same size for the gathers.

    ``all_image`` / ``all_text`` may be passed when the caller already gathered them.
    ``logit_bias`` (a SigLIP-architecture model trained with the softmax loss) is added to
    every logit, as ``ClipLoss`` does: the loss is unchanged and the bias gets no gradient,
    but it stays in the graph (DistributedDataParallel expects every parameter used).
    With ``caption_ids`` (``duplicate_matches=mask``) a caption that several images were
    matched to is the positive of each of them and a negative of none: those logits are
    left out of both softmaxes.
    """
    if info.world_size > 1:
        all_image = gather_features(image_features, info) if all_image is None else all_image
        all_text = gather_features(text_features, info) if all_text is None else all_text
        if info.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
    else:
        logits_per_image = logit_scale * image_features @ text_features.T
        logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    if info.world_size > 1 and info.local_loss:
        labels = labels + logits_per_image.shape[0] * info.rank
    if caption_ids is not None:
        global_rows = info.world_size > 1 and not info.local_loss
        rows = caption_ids.all if global_rows else caption_ids.local
        shared = duplicate_pairs(rows.to(labels.device), caption_ids.all.to(labels.device), labels)
        logits_per_image = logits_per_image.masked_fill(shared, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(shared, float("-inf"))
    if weights is None and excluded is None:
        loss = (
            F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
        ) / 2
        return loss, logits_per_image
    return _weighted_loss(logits_per_image, logits_per_text, labels, weights, excluded), (
        logits_per_image
    )


def _weighted_loss(
    logits_per_image: torch.Tensor,
    logits_per_text: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    excluded: torch.Tensor | None,
) -> torch.Tensor:
    """The weighted mean of each row's two cross-entropy terms, excluded columns masked.

    A row's own positive is never masked (its term stays finite, and weight 0 removes it).
    """
    columns = logits_per_image.shape[1]
    rows = labels
    if excluded is not None:
        hide = excluded.to(labels.device)[None, :].expand(labels.shape[0], columns).clone()
        hide[torch.arange(labels.shape[0], device=labels.device), labels] = False
        logits_per_image = logits_per_image.masked_fill(hide, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(hide, float("-inf"))
    w = torch.ones(columns, device=labels.device) if weights is None else weights
    w = w.to(labels.device, logits_per_image.dtype)[rows]
    terms = F.cross_entropy(logits_per_image, labels, reduction="none") + F.cross_entropy(
        logits_per_text, labels, reduction="none"
    )
    return (w * terms).sum() / (2 * w.sum().clamp_min(1e-12))


def retrieval_accuracy(logits_per_image: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-batch image-to-text top-1 accuracy, read off logits the loss computed anyway.

    Returned as a 0-dim tensor on the logits' device: reading it every step would stall a GPU.
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    if info.world_size > 1 and info.local_loss:
        labels = labels + logits_per_image.shape[0] * info.rank
    return (logits_per_image.argmax(dim=1) == labels).float().mean()


UNIMODAL_TEMPERATURE = 0.1  # NNCLR's and SafeCLIP's unimodal temperature


def neighbour_loss(
    queries: torch.Tensor, rows: torch.Tensor | None, temperature: float = UNIMODAL_TEMPERATURE
) -> torch.Tensor | None:
    """InfoNCE of each query against the nearest ``rows`` of all queries; None when impossible.

    ``queries`` are L2-normalised rows with gradient; ``rows`` the bank's valid rows (oldest
    first; None or empty: no bank), looked up by cosine similarity without gradient. Needs at
    least two queries. NNCLR's objective: SafeCLIP's treatment of a risky pair's two towers.
    """
    if rows is None or rows.shape[0] == 0 or queries.shape[0] < 2:
        return None
    rows = rows.to(queries.device, torch.float32)
    with torch.no_grad():
        neighbours = rows[(queries.detach().float() @ rows.T).argmax(dim=1)]
    logits = queries.float() @ neighbours.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, labels)


def unimodal_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_rows: torch.Tensor | None,
    caption_rows: torch.Tensor | None,
) -> torch.Tensor:
    """Mean of the image-image and caption-caption terms (0, in the graph, if neither applies).

    ``image_rows`` / ``caption_rows``: the valid rows of the image bank and the caption pool.
    The zero keeps both towers in the graph, so DistributedDataParallel without
    ``find_unused_parameters`` finds every parameter used.
    """
    terms = [
        t
        for t in (
            neighbour_loss(image_features, image_rows),
            neighbour_loss(text_features, caption_rows),
        )
        if t is not None
    ]
    zero = 0.0 * (image_features.sum() + text_features.sum())
    if not terms:
        return zero
    return torch.stack(terms).mean() + zero
