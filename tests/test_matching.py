"""Nearest-caption search: exactness, tie rule, invariances, bf16 re-scoring and the backends."""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from matching_problems import CHUNKS, PRECISIONS, exact_problems
from matching_problems import assert_fp32_answer as _assert_fp32_answer
from matching_problems import clustered as _clustered
from matching_problems import scores64 as _scores64

from roclip_plugin.config import RoClipConfig
from roclip_plugin.matching import (
    FaissIVFMatcher,
    FaissMatcher,
    Matcher,
    TorchMatcher,
    brute_force_nearest,
    check_matcher_settings,
    float32_tolerance,
    highest_matmul_precision,
    make_matcher,
    nearest_captions,
)
from roclip_plugin.pool import CaptionPool
from roclip_plugin.testing import (
    check_matcher,
    random_embeddings,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These tests run many tiny tensor ops: with intra-op threads they slow down many times
    # over when the CPU cores are shared with other processes.
    previous = torch.get_num_threads()
    previous_faiss = faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    faiss.omp_set_num_threads(previous_faiss)


def _split(pool: torch.Tensor, cut: int) -> list[torch.Tensor]:
    cut = min(cut, pool.shape[0])
    return [pool[:cut], pool[cut:]]


def _top2_gap(scores: torch.Tensor) -> torch.Tensor:
    if scores.shape[1] < 2:
        return torch.full((scores.shape[0],), float("inf"), dtype=scores.dtype)
    top = scores.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


# -- exactness ---------------------------------------------------------------------------------


@given(
    problem=exact_problems(),
    precision=st.sampled_from(PRECISIONS),
    chunk=st.sampled_from(CHUNKS),
    cut=st.none() | st.integers(0, 40),
    normalized=st.booleans(),
)
@SETTINGS
def test_equals_brute_force_on_exact_data(
    problem: tuple[torch.Tensor, torch.Tensor],
    precision: str,
    chunk: int,
    cut: int | None,
    normalized: bool,
) -> None:
    images, pool = problem
    want = brute_force_nearest(images, pool)
    pool_arg = pool if cut is None else _split(pool, cut)
    got = nearest_captions(
        images, pool_arg, precision=precision, chunk_size=chunk, pool_normalized=normalized
    )
    assert got.dtype == torch.long
    assert got.shape == (images.shape[0],)
    assert torch.equal(got, want)


@given(problem=exact_problems())
@SETTINGS
def test_brute_force_picks_a_maximum_with_lowest_index(
    problem: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, pool = problem
    scores = _scores64(images, pool)
    got = brute_force_nearest(images, pool)
    for i, j in enumerate(got.tolist()):
        best = scores[i].max()
        assert scores[i, j] == best
        assert not bool((scores[i, :j] == best).any())


def test_inputs_are_not_modified() -> None:
    images = torch.randn(5, 8)
    pool = torch.randn(20, 8) * 3
    images0, pool0 = images.clone(), pool.clone()
    for precision in PRECISIONS:
        nearest_captions(images, pool, precision=precision, chunk_size=3)
    assert torch.equal(images, images0)
    assert torch.equal(pool, pool0)


# -- tie rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("cut", [None, 1, 2, 3])
def test_duplicate_rows_resolve_to_lowest_index(
    precision: str, chunk: int, cut: int | None
) -> None:
    e = torch.eye(4)
    pool = torch.stack([e[2], e[0], e[1], e[0], e[1], e[2]])
    images = torch.tensor(
        [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 1.0, 0, 0], [0, 0, 0, 1.0]]
    )
    pool_arg = pool if cut is None else _split(pool, cut)
    got = nearest_captions(images, pool_arg, precision=precision, chunk_size=chunk)
    # [1,1,0,0] ties rows 1..4; [0,0,0,1] ties every row (all scores 0)
    assert got.tolist() == [1, 2, 0, 1, 0]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tie_between_different_rows_goes_to_lowest_index(precision: str) -> None:
    s = 0.5**0.5
    # rows (1, 0) and (0, 1) both score exactly 1 against the image (1, 1)
    pool = torch.tensor([[1.0, 0.0], [s, s], [0.0, 1.0]])
    image = torch.tensor([[1.0, 1.0]])
    scores = _scores64(image, pool)
    assert scores[0, 0] == scores[0, 2]
    assert nearest_captions(image, pool[[0, 2]], precision=precision).tolist() == [0]
    assert nearest_captions(image, pool[[2, 0]], precision=precision).tolist() == [0]
    assert nearest_captions(image, pool, precision=precision).tolist() == [1]


@given(
    problem=exact_problems(),
    precision=st.sampled_from(PRECISIONS),
    chunk=st.sampled_from(CHUNKS),
)
@SETTINGS
def test_appending_a_duplicate_never_changes_the_answer(
    problem: tuple[torch.Tensor, torch.Tensor], precision: str, chunk: int
) -> None:
    images, pool = problem
    first = nearest_captions(images, pool, precision=precision, chunk_size=chunk)
    doubled = torch.cat([pool, pool])
    again = nearest_captions(images, doubled, precision=precision, chunk_size=chunk)
    assert torch.equal(again, first)


# -- invariances -------------------------------------------------------------------------------


@given(
    problem=exact_problems(),
    precision=st.sampled_from(PRECISIONS),
    chunk=st.sampled_from(CHUNKS),
    exponent=st.integers(-40, 40),
)
@SETTINGS
def test_power_of_two_scaling_is_exactly_invariant(
    problem: tuple[torch.Tensor, torch.Tensor], precision: str, chunk: int, exponent: int
) -> None:
    images, pool = problem
    base = nearest_captions(images, pool, precision=precision, chunk_size=chunk)
    scaled = nearest_captions(
        images * 2.0**exponent,
        pool * 2.0 ** (-exponent // 2),
        precision=precision,
        chunk_size=chunk,
    )
    assert torch.equal(scaled, base)


@given(
    images=random_embeddings(16, 32, normalized=False),
    pool=random_embeddings(60, 32),
    precision=st.sampled_from(PRECISIONS),
    scale=st.floats(1e-3, 1e3),
)
@SETTINGS
def test_positive_scaling_keeps_separated_matches(
    images: torch.Tensor, pool: torch.Tensor, precision: str, scale: float
) -> None:
    scores = _scores64(images, pool) / images.double().norm(dim=1, keepdim=True)
    separated = _top2_gap(scores) > 1e-3
    base = nearest_captions(images, pool, precision=precision)
    scaled = nearest_captions(images * scale, pool, precision=precision)
    assert torch.equal(scaled[separated], base[separated])
    assert torch.equal(base[separated], scores.argmax(dim=1)[separated])


@given(
    images=random_embeddings(12, 16, normalized=False),
    pool=random_embeddings(40, 16),
    precision=st.sampled_from(PRECISIONS),
    chunk=st.sampled_from(CHUNKS),
    perm=st.permutations(list(range(40))),
)
@SETTINGS
def test_permutation_equivariance_on_random_data(
    images: torch.Tensor, pool: torch.Tensor, precision: str, chunk: int, perm: list[int]
) -> None:
    p = torch.tensor(perm)
    separated = _top2_gap(_scores64(images, pool)) > 1e-5
    base = nearest_captions(images, pool, precision=precision, chunk_size=chunk)
    got = p[nearest_captions(images, pool[p], precision=precision, chunk_size=chunk)]
    assert torch.equal(got[separated], base[separated])


@given(problem=exact_problems(), precision=st.sampled_from(PRECISIONS), data=st.data())
@SETTINGS
def test_permutation_equivariance_on_exact_data(
    problem: tuple[torch.Tensor, torch.Tensor], precision: str, data: st.DataObject
) -> None:
    images, pool = problem
    p = torch.tensor(data.draw(st.permutations(list(range(pool.shape[0])))))
    got = p[nearest_captions(images, pool[p], precision=precision, chunk_size=3)]
    scores = _scores64(images, pool)
    chosen = scores.gather(1, got.unsqueeze(1)).squeeze(1)
    assert torch.equal(chosen, scores.max(dim=1).values)
    # and among the tied rows of the permuted pool it picked the lowest permuted position
    inverse = torch.argsort(p)
    tied = scores == scores.max(dim=1, keepdim=True).values
    for i in range(images.shape[0]):
        assert inverse[got[i]] == inverse[tied[i]].min()


# -- bf16 with certified re-scoring ------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31),
    batch=st.integers(1, 40),
    rows=st.integers(1, 300),
    dim=st.sampled_from([8, 32, 64]),
    chunk=st.sampled_from([0, 7, 64]),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
@SETTINGS
def test_bf16_equals_fp32_on_random_data(
    seed: int, batch: int, rows: int, dim: int, chunk: int, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, dim, generator=g) * scale
    pool = F.normalize(torch.randn(rows, dim, generator=g), dim=-1)
    want = nearest_captions(images, pool, precision="fp32", chunk_size=chunk)
    got = nearest_captions(images, pool, precision="bf16", chunk_size=chunk)
    _assert_fp32_answer(got, want, images, pool)
    _assert_fp32_answer(want, brute_force_nearest(images, pool), images, pool)


@given(
    seed=st.integers(0, 2**31),
    centres=st.integers(1, 4),
    rows=st.integers(2, 700),
    dim=st.sampled_from([16, 64]),
    chunk=st.sampled_from([0, 7, 100]),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
)
@SETTINGS
def test_bf16_equals_fp32_on_clustered_near_duplicates(
    seed: int, centres: int, rows: int, dim: int, chunk: int, scale: float
) -> None:
    images, pool = _clustered(seed, centres, rows, 24, dim)
    images = images * scale
    want = nearest_captions(images, pool, precision="fp32", chunk_size=chunk)
    got = nearest_captions(images, pool, precision="bf16", chunk_size=chunk)
    _assert_fp32_answer(got, want, images, pool)


@pytest.mark.parametrize("chunk", [0, 1000, 50])
@pytest.mark.parametrize("cut", [None, 333])
def test_bf16_crowded_cluster_falls_back_to_fp32(chunk: int, cut: int | None) -> None:
    # one centre, 800 rows: far more than 256 candidates per chunk within the bf16 error bound
    images, pool = _clustered(7, 1, 800, 16, 32)
    pool_arg = pool if cut is None else _split(pool, cut)
    want = nearest_captions(images, pool_arg, precision="fp32", chunk_size=chunk)
    got = nearest_captions(images, pool_arg, precision="bf16", chunk_size=chunk)
    _assert_fp32_answer(got, want, images, pool)


def test_bf16_resolves_differences_below_bf16_resolution() -> None:
    # rows that bf16 cannot tell apart (cosines 1 - 1e-5 vs 1 - 2e-5): fp32 re-scoring must
    base = torch.zeros(3, 8)
    base[:, 0] = 1.0
    base[0, 1] = (2 * 2e-5) ** 0.5
    base[1, 1] = (2 * 1e-5) ** 0.5
    base[2, 1] = (2 * 3e-5) ** 0.5
    image = torch.zeros(1, 8)
    image[0, 0] = 1.0
    assert nearest_captions(image, base, precision="bf16").tolist() == [1]
    assert nearest_captions(image, base, precision="fp32").tolist() == [1]


# -- non-normalised pools ----------------------------------------------------------------------


@given(
    images=random_embeddings(16, 16, normalized=False),
    pool=random_embeddings(50, 16),
    log_scales=st.lists(st.floats(-6, 6), min_size=50, max_size=50),
    precision=st.sampled_from(PRECISIONS),
    chunk=st.sampled_from(CHUNKS),
)
@SETTINGS
def test_unnormalised_pool_gives_cosine_answer(
    images: torch.Tensor, pool: torch.Tensor, log_scales: list[float], precision: str, chunk: int
) -> None:
    scaled = pool * torch.tensor(log_scales).exp().unsqueeze(1)
    cosine = _scores64(images, pool) / images.double().norm(dim=1, keepdim=True)
    separated = _top2_gap(cosine) > 1e-4
    got = nearest_captions(images, scaled, precision=precision, chunk_size=chunk)
    assert torch.equal(got[separated], cosine.argmax(dim=1)[separated])


@pytest.mark.parametrize("scale", [1e-14, 1e22])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_unnormalised_pool_row_with_extreme_norm(scale: float, precision: str) -> None:
    # row 0 is exactly the image direction; row 1 is 0.8 cosine away: row 0 must win at any scale
    image = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    pool = torch.tensor([[scale, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0]])
    assert bool(torch.isfinite(pool).all())
    assert nearest_captions(image, pool, precision=precision).tolist() == [0]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_empty_pool_raises(precision: str) -> None:
    images = torch.randn(3, 4)
    with pytest.raises(ValueError, match="the caption pool is empty"):
        nearest_captions(images, torch.empty(0, 4), precision=precision)
    with pytest.raises(ValueError, match="the caption pool is empty"):
        nearest_captions(images, [], precision=precision)
    with pytest.raises(ValueError, match="the caption pool is empty"):
        nearest_captions(images, [torch.empty(0, 4), torch.empty(0, 4)], precision=precision)


def test_shape_mismatch_raises() -> None:
    images = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"pool features must be \[pool, 4\].*\(5, 5\)"):
        nearest_captions(images, torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"pool features must be \[pool, 4\]"):
        nearest_captions(images, [torch.randn(2, 4), torch.randn(2, 3)])
    with pytest.raises(ValueError, match=r"pool features must be \[pool, 4\]"):
        nearest_captions(images, torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match=r"image_features must be \[batch, dim\], got \(4,\)"):
        nearest_captions(torch.randn(4), torch.randn(5, 4))


def test_bad_precision_raises() -> None:
    with pytest.raises(
        ValueError, match=r"precision \(--roclip-precision\): invalid value 'fp16'"
    ) as info:
        nearest_captions(torch.randn(2, 4), torch.randn(3, 4), precision="fp16")
    assert "fp32, bf16" in str(info.value)


@pytest.mark.parametrize(
    "matcher",
    [TorchMatcher(), FaissMatcher(), FaissIVFMatcher(nlist=4, nprobe=4)],
    ids=["torch", "faiss", "faiss-ivf"],
)
def test_matchers_on_empty_pool_raise(matcher: Matcher) -> None:
    with pytest.raises(ValueError, match="empty"):
        matcher(torch.randn(2, 4), CaptionPool(8))


# -- matcher contract --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "matcher",
    [
        TorchMatcher(),
        TorchMatcher("bf16"),
        TorchMatcher(chunk_size=3),
        TorchMatcher("bf16", chunk_size=2),
        FaissMatcher(),
    ],
    ids=["torch-fp32", "torch-bf16", "torch-chunk3", "torch-bf16-chunk2", "faiss"],
)
def test_builtin_matchers_pass_the_contract(matcher: Matcher) -> None:
    assert isinstance(matcher, Matcher)
    check_matcher(matcher, max_examples=30)


class LastTieMatcher:
    """Exact maximum, but the LAST index among ties: breaks the tie rule."""

    def __call__(self, image_features: torch.Tensor, pool: CaptionPool) -> torch.Tensor:
        feats = pool.features()
        scores = image_features.double() @ feats.double().T
        flipped = scores.flip(1)
        return feats.shape[0] - 1 - _first_max(flipped)


def _first_max(scores: torch.Tensor) -> torch.Tensor:
    best = scores.max(dim=1, keepdim=True).values
    cols = torch.arange(scores.shape[1]).expand_as(scores)
    return torch.where(scores == best, cols, scores.shape[1]).min(dim=1).values


class ArgminMatcher:
    """The least similar caption."""

    def __call__(self, image_features: torch.Tensor, pool: CaptionPool) -> torch.Tensor:
        return brute_force_nearest(-image_features, pool.features())


class ScaleSensitiveMatcher:
    """Correct for unit-ish images, but thresholds on the raw score: breaks scale invariance."""

    def __call__(self, image_features: torch.Tensor, pool: CaptionPool) -> torch.Tensor:
        idx = brute_force_nearest(image_features, pool.features())
        small = image_features.norm(dim=1) < 1.0
        return torch.where(small, torch.zeros_like(idx), idx)


@pytest.mark.parametrize(
    "matcher",
    [LastTieMatcher(), ArgminMatcher(), ScaleSensitiveMatcher()],
    ids=["last-tie", "argmin", "scale-sensitive"],
)
def test_contract_catches_wrong_matchers(matcher: Matcher) -> None:
    # skip shrinking: only the failure matters here, not the minimal example
    previous = settings.get_current_profile_name()
    settings.register_profile(
        "roclip-no-shrink",
        settings(settings.get_profile(previous), phases=[Phase.explicit, Phase.generate]),
    )
    settings.load_profile("roclip-no-shrink")
    try:
        with pytest.raises(AssertionError):
            check_matcher(matcher, max_examples=100)
    finally:
        settings.load_profile(previous)


def test_torch_matcher_returns_logical_indices_on_wrapped_pool() -> None:
    pool = CaptionPool(5)
    rows = F.normalize(torch.randn(8, 16), dim=-1)
    pool.enqueue(rows[:3])
    pool.enqueue(rows[3:])  # wraps: logical order is rows 3..7
    assert len(pool.segments()) == 2
    images = rows[[7, 3, 5]] * 4
    for matcher in (TorchMatcher(), TorchMatcher("bf16", 1), FaissMatcher()):
        got = matcher(images, pool)
        assert got.tolist() == [4, 0, 2]
        assert torch.allclose(pool.gather(got), rows[[7, 3, 5]])


# -- faiss-ivf ---------------------------------------------------------------------------------


def test_ivf_falls_back_to_exact_below_nlist() -> None:
    pool = CaptionPool(16)
    e = torch.eye(8)
    pool.enqueue(torch.stack([e[1], e[0], e[1]]))
    matcher = FaissIVFMatcher(nlist=4, nprobe=1)
    images = torch.tensor([[0.0, 2.0, 0, 0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0, 0, 0, 0]])
    assert matcher(images, pool).tolist() == [0, 0]  # tie rule: exact scan
    assert matcher._index is None  # nothing was trained


def _near_queries(
    pool: CaptionPool, n: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries next to random pool rows, and which of them have a clear nearest row."""
    feats = pool.features()
    pick = torch.randint(0, len(pool), (n,), generator=g)
    queries = feats[pick] + 0.01 * torch.randn(n, feats.shape[1], generator=g)
    separated = _top2_gap(_scores64(queries, feats)) > 1e-3
    return queries, separated


def _assert_ivf_exact(matcher: FaissIVFMatcher, pool: CaptionPool, g: torch.Generator) -> None:
    queries, separated = _near_queries(pool, 12, g)
    got = matcher(queries, pool)
    want = brute_force_nearest(queries, pool.features())
    assert torch.equal(got[separated], want[separated])


@given(
    size=st.integers(4, 30),
    batches=st.lists(st.integers(0, 45), min_size=1, max_size=8),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=30, deadline=None)
def test_ivf_with_full_probe_agrees_and_stays_in_sync(
    size: int, batches: list[int], seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    pool = CaptionPool(size)
    matcher = FaissIVFMatcher(nlist=4, nprobe=4, seed=seed % 1000)
    rows = F.normalize(torch.randn(sum(batches) + 4, 16, generator=g), dim=-1)
    pool.enqueue(rows[:4])
    start = 4
    _assert_ivf_exact(matcher, pool, g)
    for n in batches:
        pool.enqueue(rows[start : start + n])
        start += n
        _assert_ivf_exact(matcher, pool, g)


def test_ivf_stays_in_sync_with_wrap_around_and_small_steps() -> None:
    g = torch.Generator().manual_seed(3)
    pool = CaptionPool(20)
    matcher = FaissIVFMatcher(nlist=4, nprobe=4)
    rows = F.normalize(torch.randn(200, 16, generator=g), dim=-1)
    start = 0
    for n in [6, 7, 9, 1, 13, 20, 3, 25, 2, 11]:
        pool.enqueue(rows[start : start + n])
        start += n
        assert pool.total_written == start
        _assert_ivf_exact(matcher, pool, g)
        # the newest row is found at the newest logical index
        newest = rows[start - 1 : start]
        assert matcher(newest, pool).tolist() == [len(pool) - 1]


def test_ivf_resyncs_after_load_state_dict_and_clear() -> None:
    g = torch.Generator().manual_seed(5)
    pool = CaptionPool(24)
    matcher = FaissIVFMatcher(nlist=4, nprobe=4)
    pool.enqueue(F.normalize(torch.randn(30, 16, generator=g), dim=-1))
    _assert_ivf_exact(matcher, pool, g)

    other = CaptionPool(24)
    other.enqueue(F.normalize(torch.randn(17, 16, generator=g), dim=-1))
    other.enqueue(F.normalize(torch.randn(10, 16, generator=g), dim=-1))
    generation = pool.generation
    total = pool.total_written
    pool.load_state_dict(other.state_dict())
    assert pool.generation != generation
    assert total == 30
    assert pool.total_written == other.total_written == 27
    _assert_ivf_exact(matcher, pool, g)
    queries = other.features()[[0, 5, 23]]
    assert matcher(queries, pool).tolist() == [0, 5, 23]

    # clear() keeps total_written but bumps the generation: the index must be rebuilt
    pool.clear()
    fresh = F.normalize(torch.randn(24, 16, generator=g), dim=-1)
    pool.enqueue(fresh)
    assert matcher(fresh[[2, 19]], pool).tolist() == [2, 19]
    pool.enqueue(fresh[:5] * -1)
    _assert_ivf_exact(matcher, pool, g)


# -- construction ------------------------------------------------------------------------------


def test_make_matcher_maps_config_to_class() -> None:
    torch_matcher = make_matcher(RoClipConfig(precision="bf16", match_chunk_size=77))
    assert type(torch_matcher) is TorchMatcher
    assert torch_matcher.precision == "bf16"
    assert torch_matcher.chunk_size == 77
    assert type(make_matcher(RoClipConfig(matcher="faiss"))) is FaissMatcher
    ivf = make_matcher(RoClipConfig(matcher="faiss-ivf", ivf_nlist=9, ivf_nprobe=3, seed=11))
    assert type(ivf) is FaissIVFMatcher
    assert (ivf.nlist, ivf.nprobe, ivf.seed) == (9, 3, 11)
    for name in ("torch", "faiss", "faiss-ivf"):
        assert isinstance(make_matcher(RoClipConfig(matcher=name)), Matcher)


@pytest.mark.parametrize("matcher", ["faiss", "faiss-ivf"])
@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"precision": "bf16"}, "--roclip-precision"),
        ({"match_chunk_size": 64}, "--roclip-match-chunk-size"),
    ],
)
def test_faiss_matchers_refuse_settings_they_would_ignore(
    matcher: str, fields: dict, flag: str
) -> None:
    """faiss searches in float32 with its own blocking: a bf16 or chunk request is refused."""
    config = RoClipConfig(matcher=matcher, **fields)
    with pytest.raises(ValueError, match=f"{flag}.*--roclip-matcher {matcher}"):
        make_matcher(config)
    with pytest.raises(ValueError, match=flag):
        check_matcher_settings(config)
    check_matcher_settings(RoClipConfig(matcher="torch", **fields))  # the torch scan honours them


@pytest.mark.parametrize("previous", ["medium", "high", "highest"])
def test_highest_matmul_precision_restores_previous(previous: str) -> None:
    original = torch.get_float32_matmul_precision()
    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    try:
        torch.set_float32_matmul_precision(previous)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
        with highest_matmul_precision():
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        assert torch.get_float32_matmul_precision() == previous
        assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        with pytest.raises(RuntimeError, match="boom"), highest_matmul_precision():
            raise RuntimeError("boom")
        assert torch.get_float32_matmul_precision() == previous
        # a search leaves the setting as it found it
        nearest_captions(torch.randn(2, 4), torch.randn(3, 4))
        assert torch.get_float32_matmul_precision() == previous
    finally:
        torch.set_float32_matmul_precision(original)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced


@pytest.fixture
def _new_precision_api() -> Iterator[list]:
    """torch >= 2.9's per-backend ``fp32_precision`` settings, restored after the test."""
    backends = [torch.backends.cuda.matmul]
    if hasattr(torch.backends, "mkldnn"):
        backends.append(torch.backends.mkldnn.matmul)
    if not all(hasattr(b, "fp32_precision") for b in backends):
        pytest.skip("this torch has no fp32_precision API")
    saved = [b.fp32_precision for b in backends]
    try:
        yield backends
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value


@pytest.mark.parametrize("precision", PRECISIONS)
def test_search_works_after_the_new_precision_api_was_used(
    _new_precision_api: list, precision: str
) -> None:
    """A trainer that sets ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (the API
    torch recommends since 2.9) makes ``torch.get_float32_matmul_precision()`` raise; the
    search must run, in IEEE float32, and leave the trainer's settings as they were."""
    cuda_matmul = _new_precision_api[0]
    cuda_matmul.fp32_precision = "tf32"
    before = [b.fp32_precision for b in _new_precision_api]
    images, pool = _clustered(3, 4, 300, 32, 16)
    got = nearest_captions(images, pool, precision=precision)
    assert torch.equal(got, brute_force_nearest(images, pool))
    with highest_matmul_precision():
        assert all(b.fp32_precision == "ieee" for b in _new_precision_api)
    assert [b.fp32_precision for b in _new_precision_api] == before
    with pytest.raises(RuntimeError, match="boom"), highest_matmul_precision():
        raise RuntimeError("boom")
    assert [b.fp32_precision for b in _new_precision_api] == before


# -- ambient autocast, non-finite queries, the documented tolerance -----------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_search_ignores_ambient_autocast(precision: str) -> None:
    images, pool = _clustered(3, 4, 2000, 64, 64)
    want = nearest_captions(images, pool, precision=precision)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_captions(images, pool, precision=precision)
        reference = brute_force_nearest(images, pool)
    assert torch.equal(got, want)
    assert torch.equal(reference, brute_force_nearest(images, pool))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_non_finite_image_rows_raise(precision: str) -> None:
    images = torch.randn(5, 4)
    images[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 5 image feature rows are non-finite"):
        nearest_captions(images, torch.randn(6, 4), precision=precision)


def _two_rows_per_image(gap: float, batch: int = 64, dim: int = 32):
    """Unit images and, per image, two pool rows of cosine 0.5 and 0.5 - gap (worse first)."""
    g = torch.Generator().manual_seed(5)
    a = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)

    def orthogonal(*basis: torch.Tensor) -> torch.Tensor:
        x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        for b in basis:
            x = x - (x * b).sum(1, keepdim=True) * b
        return F.normalize(x, dim=-1)

    u = orthogonal(a)
    v = orthogonal(a, u)
    better = 0.5 * a + 0.75**0.5 * u
    worse = (0.5 - gap) * a + (1 - (0.5 - gap) ** 2) ** 0.5 * v
    return a.float(), torch.stack([worse, better], dim=1).reshape(2 * batch, dim).float()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_answers_are_within_the_float32_tolerance_of_the_best(precision: str) -> None:
    """The documented guarantee, for near-ties (gap 1e-7) and for separated rows alike."""
    for gap in (1e-8, 1e-7, 1e-5):
        images, pool = _two_rows_per_image(gap)
        tol = float32_tolerance(images).double()
        assert bool((gap < tol).all()) == (gap < 1e-6)
        got = nearest_captions(images, pool, precision=precision)
        scores = images.double() @ pool.double().T
        best = scores.max(dim=1)
        deficit = best.values - scores.gather(1, got.unsqueeze(1)).squeeze(1)
        assert bool((deficit <= tol).all()), gap
        if gap >= 1e-5:  # a lead beyond the tolerance: the exact answer, in both precisions
            assert torch.equal(got, best.indices)
