"""Problems and checks shared by the CPU and the CUDA matching tests.

Kept apart from ``test_matching.py`` because that module needs faiss, which the GPU machine's
image lacks: ``test_matching_cuda.py`` imports only this, so the gpu-marked matching tests run
there (``benchmarks/gpu_evidence.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from roclip_plugin.testing import exact_embeddings, grid_images

PRECISIONS = ["fp32", "bf16"]
CHUNKS = [1, 3, 0]


@st.composite
def exact_problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, pool) whose every score is exact in float32 and bfloat16."""
    dim = draw(st.sampled_from([4, 8, 16]))
    rows = draw(st.integers(1, 40))
    batch = draw(st.integers(1, 10))
    return draw(grid_images(batch, dim)), draw(exact_embeddings(rows, dim))


def scores64(images: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Cosine scores in float64: the reference the searches are checked against."""
    return images.double() @ F.normalize(pool.double(), dim=-1).T


def assert_fp32_answer(
    got: torch.Tensor, want: torch.Tensor, images: torch.Tensor, pool: torch.Tensor
) -> None:
    """``got`` is the float32 answer ``want``, except between rows tied up to float32 rounding."""
    scores = scores64(images, pool)
    tol = images.double().norm(dim=1) * images.shape[1] * 2.0**-23
    best = scores.max(dim=1).values
    got_s = scores.gather(1, got.cpu().unsqueeze(1)).squeeze(1)
    want_s = scores.gather(1, want.cpu().unsqueeze(1)).squeeze(1)
    assert bool((best - got_s <= tol).all()), f"not a maximum: deficit {(best - got_s).max()}"
    differ = got.cpu() != want.cpu()
    assert bool(((got_s - want_s).abs() <= tol)[differ].all()), (
        f"rows {differ.nonzero().flatten().tolist()} differ by more than float32 rounding"
    )


def clustered(
    seed: int, centres: int, rows: int, batch: int, dim: int, noise: float = 0.003
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and a pool of near-duplicates around a few centres: hard for bf16 search."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centres, dim, generator=g), dim=-1)
    pool = c[torch.randint(0, centres, (rows,), generator=g)]
    pool = F.normalize(pool + noise * torch.randn(rows, dim, generator=g), dim=-1)
    images = c[torch.randint(0, centres, (batch,), generator=g)]
    images = images + noise * torch.randn(batch, dim, generator=g)
    return images, pool
