"""Scan a dataset for poisoned pairs after the fact, from its embeddings (``roclip scan``).

The core of the scan: detectors over given L2-normalised image and caption embeddings
(:mod:`.detectors`; :mod:`.groups` for the scores read over each image's nearest images),
neighbour search with faiss (:mod:`.neighbours`), ranks and the metrics that judge them
(:mod:`.ranks`), and the chunked, resumable store of embeddings on disk (:mod:`.store`).
Embedding a dataset with a model is the kit's part (``roclip_kit.evaluate.scan``); nothing
here imports OpenCLIP or an integration. docs/scan.md.
"""

from roclip_plugin.scan.detectors import (
    DETECTORS,
    ScanSettings,
    cosine_score,
    density_scores,
    margin_score,
    reference_rows,
    score_embeddings,
)
from roclip_plugin.scan.groups import group_score, image_neighbours, targeted_score
from roclip_plugin.scan.neighbours import nearest, search_index
from roclip_plugin.scan.ranks import (
    auroc,
    average_ranks,
    precision_at_k,
    rank_max,
    rank_mean,
    top_rows,
)
from roclip_plugin.scan.store import EmbeddingStore

__all__ = [
    "DETECTORS",
    "EmbeddingStore",
    "ScanSettings",
    "auroc",
    "average_ranks",
    "cosine_score",
    "density_scores",
    "group_score",
    "image_neighbours",
    "margin_score",
    "nearest",
    "precision_at_k",
    "rank_max",
    "rank_mean",
    "reference_rows",
    "score_embeddings",
    "search_index",
    "targeted_score",
    "top_rows",
]
