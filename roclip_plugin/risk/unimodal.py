"""Unimodal nearest-neighbour contrastive terms (SafeCLIP's treatment of risky pairs).

A risky pair is never pulled together across modalities, but its image and its caption still
teach their own tower: each embedding's positive is its nearest neighbour among recent
embeddings of the same modality (a bank of images, the caption pool for captions), and the
other queries' neighbours are its negatives (NNCLR's objective). The same terms are the whole
loss during the unimodal warm-up, so nothing is linked across modalities before risk can be
judged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from roclip_plugin.pool import CaptionPool

TEMPERATURE = 0.1  # NNCLR's and SafeCLIP's unimodal temperature


def nearest_neighbour_loss(
    queries: torch.Tensor, bank: CaptionPool | None, temperature: float = TEMPERATURE
) -> torch.Tensor | None:
    """InfoNCE of each query against the bank neighbours of all queries; None when impossible.

    ``queries`` are L2-normalised rows with gradient; their neighbours are looked up in the
    bank (detached) by cosine similarity. Needs at least two queries and a non-empty bank.
    """
    if bank is None or len(bank) == 0 or queries.shape[0] < 2:
        return None
    rows = bank.features().to(queries.device, torch.float32)
    with torch.no_grad():
        neighbours = rows[(queries.detach().float() @ rows.T).argmax(dim=1)]
    logits = queries.float() @ neighbours.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, labels)


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
    terms = [
        t
        for t in (
            nearest_neighbour_loss(image_features, image_bank),
            nearest_neighbour_loss(text_features, caption_pool),
        )
        if t is not None
    ]
    zero = 0.0 * (image_features.sum() + text_features.sum())
    if not terms:
        return zero
    return torch.stack(terms).mean() + zero
