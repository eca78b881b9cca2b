"""Constructed embeddings for the scan's tests: clean classes, a backdoor, a targeted attack."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Planted:
    images: np.ndarray
    captions: np.ndarray
    backdoor: np.ndarray  # bool per row
    targeted: np.ndarray  # bool per row


def planted(
    seed: int = 0,
    *,
    clean: int = 600,
    backdoor: int = 12,
    targets: int = 2,
    copies: int = 10,
    dim: int = 16,
    classes: int = 5,
) -> Planted:
    """Clean pairs around class centres (captions near their images); a tight backdoor cluster
    away from every class, captioned with one class; ``targets`` images each repeated
    ``copies`` times with captions of another class."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(classes, dim)))
    label = rng.integers(classes, size=clean)
    img = [centres[label] + 0.12 * rng.normal(size=(clean, dim))]
    cap = [centres[label] + 0.1 * rng.normal(size=(clean, dim))]
    spot = unit(rng.normal(size=(1, dim)))
    img.append(spot + 0.02 * rng.normal(size=(backdoor, dim)))
    cap.append(centres[[0] * backdoor] + 0.1 * rng.normal(size=(backdoor, dim)))
    for t in range(targets):
        source = centres[t % classes] + 0.12 * rng.normal(size=(1, dim))
        img.append(np.repeat(source, copies, axis=0))
        other = centres[[(t + 2) % classes] * copies]
        cap.append(other + 0.1 * rng.normal(size=(copies, dim)))
    n = clean + backdoor + targets * copies
    kinds = np.zeros(n, dtype=int)
    kinds[clean : clean + backdoor] = 1
    kinds[clean + backdoor :] = 2
    return Planted(unit(np.concatenate(img)), unit(np.concatenate(cap)), kinds == 1, kinds == 2)
