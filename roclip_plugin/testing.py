"""Hypothesis strategies and contract checks for plugin authors (needs ``hypothesis``).

A matcher plugin is correct when it agrees with brute force. Float32 rounding makes "agrees"
fuzzy on arbitrary data, so the contract uses *exact* data: pool rows whose entries are
``±1/sqrt(m)`` for ``m`` in {1, 4, 16} (unit norm exactly) and images with small integer
entries. Every product and sum is then exact in float32 (and bfloat16 inputs), so ties are
real ties and any correct exhaustive matcher must give bit-identical answers::

    from roclip_plugin.testing import check_matcher
    check_matcher(MyMatcher())          # raises AssertionError naming the broken property
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - exercised only without the test extra
    raise ImportError(
        "roclip_plugin.testing needs hypothesis: pip install 'roclip-plugin[test]'"
    ) from err

from roclip_plugin.matching import Matcher, brute_force_nearest
from roclip_plugin.pool import CaptionPool

# -- strategies -------------------------------------------------------------------------------


@st.composite
def exact_unit_vectors(draw: st.DrawFn, dim: int) -> torch.Tensor:
    """A unit vector with ``m`` entries ``±1/sqrt(m)``, ``m`` in {1, 4, 16}: its norm is 1."""
    m = draw(st.sampled_from([k for k in (1, 4, 16) if k <= dim]))
    positions = draw(st.lists(st.integers(0, dim - 1), min_size=m, max_size=m, unique=True))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=m, max_size=m))
    vec = torch.zeros(dim)
    vec[positions] = torch.tensor(signs) / m**0.5
    return vec


@st.composite
def exact_embeddings(draw: st.DrawFn, rows: int, dim: int) -> torch.Tensor:
    """``[rows, dim]`` of :func:`exact_unit_vectors`, drawn from a small set so rows repeat."""
    alphabet = draw(st.lists(exact_unit_vectors(dim), min_size=1, max_size=max(2, rows // 2)))
    picks = draw(st.lists(st.integers(0, len(alphabet) - 1), min_size=rows, max_size=rows))
    return torch.stack([alphabet[i] for i in picks])


@st.composite
def grid_images(draw: st.DrawFn, rows: int, dim: int) -> torch.Tensor:
    """``[rows, dim]`` with integer entries in [-4, 4], no zero row: exact scores vs exact pools."""
    values = draw(st.lists(st.integers(-4, 4), min_size=rows * dim, max_size=rows * dim))
    images = torch.tensor(values, dtype=torch.float32).reshape(rows, dim)
    zero = images.abs().sum(dim=1) == 0
    images[zero, 0] = 1.0
    return images


@st.composite
def random_embeddings(
    draw: st.DrawFn, rows: int, dim: int, *, normalized: bool = True
) -> torch.Tensor:
    """Gaussian ``[rows, dim]`` from a drawn seed (fast for large shapes), optionally unit rows."""
    seed = draw(st.integers(0, 2**32 - 1))
    out = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(out, dim=-1) if normalized else out


def enqueue_sizes(max_batch: int = 40, max_batches: int = 8) -> st.SearchStrategy[list[int]]:
    """Batch sizes for a sequence of enqueues (may exceed the pool, may be empty)."""
    return st.lists(st.integers(0, max_batch), min_size=1, max_size=max_batches)


@dataclass
class PoolCase:
    """A pool built by a sequence of enqueues, with the rows it was fed in order."""

    pool: CaptionPool
    fed: torch.Tensor


@st.composite
def pools(
    draw: st.DrawFn,
    *,
    dim: int = 8,
    max_size: int = 32,
    exact: bool = True,
) -> PoolCase:
    """A :class:`CaptionPool` after random enqueues (often wrapped around its end)."""
    size = draw(st.integers(1, max_size))
    sizes = draw(enqueue_sizes(max_batch=max(2, size + size // 2)))
    total = max(sum(sizes), 1)
    rows = draw(exact_embeddings(total, dim) if exact else random_embeddings(total, dim))
    pool = CaptionPool(size)
    start = 0
    for n in sizes:
        if n:
            pool.enqueue(rows[start : start + n])
        start += n
    if len(pool) == 0:
        pool.enqueue(rows[:1])
        start = max(start, 1)
    return PoolCase(pool, rows[: max(start, 1)])


# -- the matcher contract ------------------------------------------------------------------------


def _scores(images: torch.Tensor, pool_rows: torch.Tensor) -> torch.Tensor:
    return images.double() @ pool_rows.double().T


def assert_exact(matcher: Matcher, images: torch.Tensor, pool: CaptionPool) -> None:
    """The matcher equals brute force (first index of the float32 maximum)."""
    got = matcher(images, pool).cpu()
    want = brute_force_nearest(images, pool.features()).cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero().flatten().tolist()
        raise AssertionError(
            f"matcher disagrees with brute force on rows {bad[:5]}: got {got[bad[:5]].tolist()}, "
            f"want {want[bad[:5]].tolist()} (pool of {len(pool)} rows)"
        )


def assert_tie_rule(matcher: Matcher, images: torch.Tensor, pool: CaptionPool) -> None:
    """Among equally similar pool rows the lowest (oldest) index wins."""
    got = matcher(images, pool).cpu()
    scores = _scores(images, pool.features())
    best = scores.max(dim=1, keepdim=True).values
    cols = torch.arange(scores.shape[1]).expand_as(scores)
    lowest = torch.where(scores == best, cols, scores.shape[1]).min(dim=1).values
    if not torch.equal(got, lowest):
        raise AssertionError(
            f"tie rule broken: got {got.tolist()}, lowest tied indices {lowest.tolist()}"
        )


def assert_scale_invariant(
    matcher: Matcher, images: torch.Tensor, pool: CaptionPool, scales: Sequence[float]
) -> None:
    """Scaling image rows by positive factors (powers of two: exact) keeps every match."""
    base = matcher(images, pool).cpu()
    for scale in scales:
        got = matcher(images * scale, pool).cpu()
        if not torch.equal(got, base):
            raise AssertionError(f"scaling images by {scale} changed matches: {base} -> {got}")


def assert_permutation_equivariant(
    matcher: Matcher, images: torch.Tensor, pool: CaptionPool, perm: torch.Tensor
) -> None:
    """Permuting the pool permutes the answer: the match is still a most similar row."""
    rows = pool.features()
    permuted = CaptionPool(len(rows))
    permuted.enqueue(rows[perm])
    got = perm[matcher(images, permuted).cpu()]
    scores = _scores(images, rows)
    chosen = scores.gather(1, got.unsqueeze(1)).squeeze(1)
    if not torch.equal(chosen, scores.max(dim=1).values):
        raise AssertionError(
            f"after permuting the pool the matcher picked rows {got.tolist()} that are not most "
            "similar"
        )


def check_matcher(matcher: Matcher, *, max_examples: int = 60, dim: int = 8) -> None:
    """Run the whole contract on hypothesis-generated exact data; raises on the first breach.

    Args:
        matcher: the matcher under test (called with many different pools).
        max_examples: generated examples.
        dim: embedding width of the generated data (at least 1).
    """

    @settings(
        max_examples=max_examples,
        derandomize=True,  # the same examples on every run: a contract check must not flake
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        case=pools(dim=dim),
        images=st.integers(1, 12).flatmap(lambda b: grid_images(b, dim)),
        k=st.integers(-3, 3),
        data=st.data(),
    )
    def run(case: PoolCase, images: torch.Tensor, k: int, data: st.DataObject) -> None:
        assert_exact(matcher, images, case.pool)
        assert_tie_rule(matcher, images, case.pool)
        assert_scale_invariant(matcher, images, case.pool, [2.0**k, 0.5])
        perm = torch.tensor(data.draw(st.permutations(range(len(case.pool)))), dtype=torch.long)
        assert_permutation_equivariant(matcher, images, case.pool, perm)

    run()
