"""Unimodal nearest-neighbour contrastive terms (SafeCLIP's treatment of risky pairs).

A risky pair is never pulled together across modalities, but its image and its caption still
teach their own tower: each embedding's positive is its nearest neighbour among recent
embeddings of the same modality (a bank of images, the caption pool for captions), and the
other queries' neighbours are its negatives (NNCLR's objective). The same terms are the whole
loss during the unimodal warm-up, so nothing is linked across modalities before risk can be
judged.

The math is the loss's (:func:`roclip_plugin.contrastive.unimodal_terms`, on the banks' rows as
tensors: the loss never holds a bank); these take the banks themselves, for callers that do.
"""

from __future__ import annotations

import torch

from roclip_plugin.contrastive import UNIMODAL_TEMPERATURE, neighbour_loss, unimodal_terms
from roclip_plugin.pool import CaptionPool

TEMPERATURE = UNIMODAL_TEMPERATURE


def bank_rows(bank: CaptionPool | None) -> torch.Tensor | None:
    """The valid rows of ``bank`` (oldest first), None without a bank."""
    return None if bank is None else bank.features()


def nearest_neighbour_loss(
    queries: torch.Tensor, bank: CaptionPool | None, temperature: float = TEMPERATURE
) -> torch.Tensor | None:
    """InfoNCE of each query against the bank neighbours of all queries; None when impossible.

    ``queries`` are L2-normalised rows with gradient; their neighbours are looked up in the
    bank (detached) by cosine similarity. Needs at least two queries and a non-empty bank.
    """
    return neighbour_loss(queries, bank_rows(bank), temperature)


def unimodal_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_bank: CaptionPool | None,
    caption_pool: CaptionPool | None,
) -> torch.Tensor:
    """Mean of the image-image and caption-caption terms (0, in the graph, if neither applies).

    The zero keeps both towers in the graph, so DistributedDataParallel without
    ``find_unused_parameters`` finds every parameter used.
    """
    return unimodal_terms(
        image_features, text_features, bank_rows(image_bank), bank_rows(caption_pool)
    )
