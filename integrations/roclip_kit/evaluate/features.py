"""Features of a loaded model: images and texts encoded, checked finite, class prompts averaged.

The thin layer between a :class:`~roclip_kit.train.loaded.LoadedModel` and the pure metrics
of :mod:`roclip_kit.evaluate.metrics`; ``roclip scan`` encodes its pairs with it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from roclip_kit.evaluate.metrics import average_templates
from roclip_kit.files import ClassInfo, read_image
from roclip_kit.train.loaded import LoadedModel

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], Advance]
"""``progress(description, total)`` returns a callback advanced by the items just done."""


def encode_images(
    loaded: LoadedModel,
    filepaths: Sequence[str],
    *,
    batch_size: int = 64,
    transform: Callable[[Any], Any] | None = None,
    progress: Advance | None = None,
    where: Callable[[int], str] | None = None,
) -> torch.Tensor:
    """Normalised image embeddings ``[N, dim]``, on the CPU.

    ``transform`` (a trigger) is applied to each PIL image as stored (its own mode), as the
    poisoner stamped training images, then it is made RGB and preprocessed for validation.
    ``where(i)`` names the ``i``-th file's place (its CSV row) when a file cannot be read.
    Features that are not finite raise ``ValueError``: a broken model must not score as chance.
    """
    chunks = []
    for start in range(0, len(filepaths), batch_size):
        images = []
        for i, path in enumerate(filepaths[start : start + batch_size], start):
            picture = read_image(path, where(i) if where else None)
            if transform is not None:
                picture = transform(picture)
            images.append(loaded.preprocess(picture.convert("RGB")))
        batch = torch.stack(images).to(loaded.device)
        with torch.no_grad():
            features = loaded.model.encode_image(batch).float()
        chunks.append(_finite(F.normalize(features, dim=-1).cpu(), "image", loaded))
        if progress is not None:
            progress(len(images))
    return torch.cat(chunks)


def _finite(features: torch.Tensor, kind: str, loaded: LoadedModel) -> torch.Tensor:
    if not bool(torch.isfinite(features).all()):
        raise ValueError(
            f"the model of {loaded.checkpoint} produced NaN or inf {kind} features: its weights "
            "are finite but it overflows on these inputs; evaluate another epoch (and --device "
            "cpu in float32 if a GPU run is in half precision)"
        )
    return features


def encode_texts(
    loaded: LoadedModel, texts: Sequence[str], *, batch_size: int = 256
) -> torch.Tensor:
    """Normalised text embeddings ``[N, dim]`` (on the CPU)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(list(texts[start : start + batch_size])).to(loaded.device)
        with torch.no_grad():
            features = loaded.model.encode_text(tokens).float()
        chunks.append(_finite(F.normalize(features, dim=-1).cpu(), "text", loaded))
    return torch.cat(chunks)


def class_embeddings(loaded: LoadedModel, classes: ClassInfo) -> torch.Tensor:
    """One embedding per class: its normalised template prompts, averaged and renormalised."""
    prompts = [t.format(name) for name in classes.names for t in classes.templates]
    features = encode_texts(loaded, prompts)
    return average_templates(features.reshape(len(classes.names), len(classes.templates), -1))


def check_images(filepaths: Sequence[str], where: Callable[[int], str]) -> None:
    """Fail before encoding, naming the first missing image and where it was listed."""
    for i, path in enumerate(filepaths):
        if not Path(path).is_file():
            raise ValueError(
                f"image {path} ({where(i)}) does not exist; a filepath is absolute or "
                "relative to the current directory or to the CSV's folder"
            )
