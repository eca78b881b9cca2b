"""CaptionPool: FIFO ring buffer semantics against a plain Python list model."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin.pool import CaptionPool
from roclip_plugin.testing import PoolCase, pools

DIM = 4
SETTINGS = settings(max_examples=60, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These tests run many tiny tensor ops: with intra-op threads they slow down many times
    # over when the CPU cores are shared with other processes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rows(n: int, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    """Distinct, non-zero random rows."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + 0.1


def _normalised(rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(rows.float(), dim=-1)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@st.composite
def feeds(draw: st.DrawFn, max_size: int = 12) -> tuple[int, list[int], int]:
    """(pool size, batch sizes from 0 to more than the pool, data seed)."""
    size = draw(st.integers(1, max_size))
    batches = draw(st.lists(st.integers(0, 2 * size + 3), min_size=1, max_size=10))
    return size, batches, draw(st.integers(0, 2**31))


class Model:
    """A list of every valid row fed, oldest first; the pool is its tail."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: list[torch.Tensor] = []

    def feed(self, batch: torch.Tensor) -> None:
        for row in batch:
            if bool(torch.isfinite(row).all()) and bool((row != 0).any()):
                self.rows.append(row)

    def expected(self, dim: int = DIM) -> torch.Tensor:
        tail = self.rows[-self.size :] if self.rows else []
        if not tail:
            return torch.empty(0, dim)
        return _normalised(torch.stack(tail))


def _feed_both(pool: CaptionPool, model: Model, batches: list[int], seed: int) -> torch.Tensor:
    data = _rows(max(sum(batches), 1), seed=seed)
    start = 0
    for n in batches:
        batch = data[start : start + n]
        stored = pool.enqueue(batch)
        if n <= pool.size:
            assert stored == n
        model.feed(batch)
        start += n
    return data


# -- FIFO semantics ----------------------------------------------------------------------------


@given(case=feeds())
@SETTINGS
def test_features_are_last_rows_oldest_first(case: tuple[int, list[int], int]) -> None:
    size, batches, seed = case
    pool, model = CaptionPool(size), Model(size)
    data = torch.randn(max(sum(batches), 1), DIM, generator=torch.Generator().manual_seed(seed))
    start = 0
    for n in batches:
        pool.enqueue(data[start : start + n])
        model.feed(data[start : start + n])
        start += n
        want = model.expected()
        assert len(pool) == want.shape[0] == min(size, len(model.rows))
        assert pool.is_full == (len(model.rows) >= size)
        if len(pool):
            _close(pool.features(), want)
            _close(torch.cat(pool.segments()), want)
        else:
            assert pool.features().shape[0] == 0
            assert pool.segments() == []
    assert pool.total_written == len(model.rows)
    assert pool.rejected == 0


@given(case=feeds(), bad=st.lists(st.sampled_from(["nan", "inf", "-inf", "zero", "ok"])))
@SETTINGS
def test_model_with_bad_rows_mixed_in(case: tuple[int, list[int], int], bad: list[str]) -> None:
    size, batches, seed = case
    pool, model = CaptionPool(size), Model(size)
    data = _rows(max(sum(batches), 1), seed=seed)
    kinds = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "zero": 0.0}
    n_bad = 0
    for i, kind in enumerate(bad[: data.shape[0]]):
        if kind == "zero":
            data[i] = 0.0
            n_bad += 1
        elif kind != "ok":
            data[i, i % DIM] = kinds[kind]
            n_bad += 1
    start = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for n in batches:
            batch = data[start : start + n]
            before = pool.rejected
            stored = pool.enqueue(batch)
            model.feed(batch)
            if n <= size:
                assert stored == n - (pool.rejected - before)
            start += n
    fed_bad = sum(1 for k in bad[: min(start, data.shape[0])] if k != "ok")
    assert pool.rejected == fed_bad <= n_bad
    want = model.expected()
    assert len(pool) == want.shape[0]
    if len(pool):
        feats = pool.features()
        assert bool(torch.isfinite(feats).all())
        _close(feats, want)


def test_wrap_around_writes_batch_tail_to_the_front() -> None:
    pool = CaptionPool(5)
    data = _rows(7)
    pool.enqueue(data[:3])
    assert pool.oldest_slot == 0
    assert pool.enqueue(data[3:7]) == 4  # slots 3, 4 then wraps to 0, 1
    assert len(pool) == 5
    assert pool.total_written == 7
    segs = pool.segments()
    assert len(segs) == 2
    _close(segs[0], _normalised(data[2:5]))  # physical slots 2..4: oldest rows
    _close(segs[1], _normalised(data[5:7]))  # the batch tail, now at the front
    _close(pool.features(), _normalised(data[2:7]))
    assert pool.oldest_slot == 2
    assert pool.physical_slots(torch.arange(5)).tolist() == [2, 3, 4, 0, 1]


@pytest.mark.parametrize(("size", "first", "batch"), [(4, 0, 10), (4, 3, 10), (5, 2, 5), (1, 1, 3)])
def test_batch_larger_than_pool_keeps_newest_rows(size: int, first: int, batch: int) -> None:
    pool = CaptionPool(size)
    data = _rows(first + batch)
    if first:
        pool.enqueue(data[:first])
    pool.enqueue(data[first:])
    assert len(pool) == size
    _close(pool.features(), _normalised(data[-size:]))
    assert pool.total_written == first + batch


def test_never_written_slots_are_never_returned() -> None:
    pool = CaptionPool(10, dim=DIM, device="cpu")
    assert len(pool) == 0
    assert pool.segments() == []
    assert pool.features().shape == (0, DIM)
    data = _rows(3)
    pool.enqueue(data)
    feats = pool.features()
    assert feats.shape == (3, DIM)
    assert sum(s.shape[0] for s in pool.segments()) == 3
    assert bool((feats.norm(dim=1) > 0.99).all())
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        pool.gather(torch.tensor([3]))
    with pytest.raises(IndexError):
        pool.gather(torch.tensor([-1]))


def test_clear_forgets_rows_and_bumps_generation() -> None:
    pool = CaptionPool(4)
    pool.enqueue(_rows(3))
    gen = pool.generation
    pool.clear()
    assert len(pool) == 0
    assert pool.segments() == []
    assert pool.generation == gen + 1
    data = _rows(2, seed=1)
    pool.enqueue(data)
    _close(pool.features(), _normalised(data))


def test_gather_on_unallocated_pool_raises() -> None:
    with pytest.raises(RuntimeError, match="empty"):
        CaptionPool(3).gather(torch.tensor([0]))


@given(case=feeds(), data=st.data())
@SETTINGS
def test_gather_equals_features_indexing(
    case: tuple[int, list[int], int], data: st.DataObject
) -> None:
    size, batches, seed = case
    pool = CaptionPool(size)
    _feed_both(pool, Model(size), batches, seed)
    if len(pool) == 0:
        return
    idx = torch.tensor(
        data.draw(st.lists(st.integers(0, len(pool) - 1), max_size=20)), dtype=torch.long
    )
    assert torch.equal(pool.gather(idx), pool.features()[idx])


@given(case=pools(dim=DIM, max_size=16))
@settings(max_examples=40, deadline=None)
def test_pools_strategy_matches_the_model(case: PoolCase) -> None:
    pool = case.pool
    _close(pool.features(), _normalised(case.fed[-pool.size :]))


# -- refusing bad rows -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_are_refused(bad: float) -> None:
    pool = CaptionPool(8)
    data = _rows(4)
    data[1, 2] = bad
    with pytest.warns(RuntimeWarning, match="refused 1 caption embedding"):
        assert pool.enqueue(data) == 3
    assert pool.rejected == 1
    assert len(pool) == 3
    assert pool.total_written == 3
    _close(pool.features(), _normalised(data[[0, 2, 3]]))


def test_zero_rows_are_refused() -> None:
    pool = CaptionPool(8)
    data = _rows(3)
    data[0] = 0.0
    with pytest.warns(RuntimeWarning, match="non-finite or zero"):
        pool.enqueue(data)
    assert pool.rejected == 1
    _close(pool.features(), _normalised(data[1:]))


def test_all_bad_batch_stores_nothing() -> None:
    pool = CaptionPool(4)
    with pytest.warns(RuntimeWarning):
        assert pool.enqueue(torch.full((3, DIM), float("nan"))) == 0
    assert len(pool) == 0
    assert pool.rejected == 3
    assert pool.total_written == 0


def test_bad_rows_warn_only_once() -> None:
    pool = CaptionPool(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            data = _rows(3, seed=i)
            data[0, 0] = float("nan")
            data[2] = 0.0
            pool.enqueue(data)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "pool.rejected" in str(runtime[0].message)
    assert pool.rejected == 8
    assert len(pool) == 4


@pytest.mark.parametrize("scale", [1e-20, 1e-6, 1.0, 1e6, 1e25])
def test_stored_rows_are_unit_norm_at_any_finite_scale(scale: float) -> None:
    # A finite, non-zero row is either refused (and counted) or stored finite and unit-norm.
    pool = CaptionPool(4)
    data = _normalised(_rows(2)) * scale
    assert bool(torch.isfinite(data).all()) and bool((data != 0).any(dim=1).all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pool.enqueue(data)
    assert len(pool) + pool.rejected == 2
    feats = pool.features()
    assert bool(torch.isfinite(feats).all())
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(pool)), rtol=0, atol=1e-5)
    if len(pool) == 2:
        torch.testing.assert_close(feats, _normalised(_rows(2)), rtol=0, atol=1e-5)


def test_float64_rows_beyond_float32_range_are_never_stored_as_non_finite() -> None:
    pool = CaptionPool(4)
    data = torch.tensor([[1e200, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pool.enqueue(data)
    assert len(pool) + pool.rejected == 2
    feats = pool.features()
    assert bool(torch.isfinite(feats).all()), feats
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(pool)), rtol=0, atol=1e-5)


def test_rows_are_normalised_float32_even_from_bfloat16() -> None:
    pool = CaptionPool(8)
    data = (_rows(5) * 3).bfloat16()
    pool.enqueue(data)
    feats = pool.features()
    assert feats.dtype == torch.float32
    assert pool.state_dict()["features"].dtype == torch.float32
    _close(feats, _normalised(data.float()))
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5), rtol=0, atol=1e-6)


def test_enqueue_detaches_and_copies() -> None:
    pool = CaptionPool(4)
    data = _rows(2).requires_grad_()
    pool.enqueue(data * 2)
    feats = pool.features()
    assert not feats.requires_grad
    with torch.no_grad():
        data.mul_(-1)
    _close(pool.features(), feats)


# -- shape errors ------------------------------------------------------------------------------


def test_dim_mismatch_raises() -> None:
    pool = CaptionPool(4)
    pool.enqueue(_rows(2, dim=4))
    with pytest.raises(ValueError, match="dim 5 but the pool holds dim 4"):
        pool.enqueue(_rows(2, dim=5))
    assert len(pool) == 2


def test_dim_given_at_construction_is_enforced() -> None:
    pool = CaptionPool(4, dim=8)
    with pytest.raises(ValueError, match="dim"):
        pool.enqueue(_rows(2, dim=5))


def test_preallocated_pool_checks_dim() -> None:
    pool = CaptionPool(4, dim=8, device="cpu")
    with pytest.raises(ValueError, match="dim 5 but the pool holds dim 8"):
        pool.enqueue(_rows(2, dim=5))


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_non_matrix_features_raise(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        CaptionPool(4).enqueue(torch.ones(shape))


@pytest.mark.parametrize("size", [0, -1, 2.0, True, "4"])
def test_bad_pool_size(size: object) -> None:
    with pytest.raises(ValueError, match="CaptionPool size"):
        CaptionPool(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [0, -3, 2.5])
def test_bad_pool_dim(dim: object) -> None:
    with pytest.raises(ValueError, match="CaptionPool dim"):
        CaptionPool(4, dim=dim)  # type: ignore[arg-type]


# -- checkpoints -------------------------------------------------------------------------------


def _roundtrip_bytes(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@given(case=feeds(), later=st.lists(st.integers(0, 30), max_size=5), seed2=st.integers(0, 2**31))
@SETTINGS
def test_state_dict_round_trip_and_identical_future(
    case: tuple[int, list[int], int], later: list[int], seed2: int
) -> None:
    size, batches, seed = case
    original = CaptionPool(size)
    _feed_both(original, Model(size), batches, seed)
    state = _roundtrip_bytes(original.state_dict())
    restored = CaptionPool(size)
    restored.load_state_dict(state)
    assert len(restored) == len(original)
    assert torch.equal(restored.features(), original.features())
    assert restored.total_written == original.total_written
    assert restored.rejected == original.rejected
    assert restored.checksum() == original.checksum()

    extra = _rows(max(sum(later), 1), seed=seed2)
    start = 0
    for n in later:
        a = original.enqueue(extra[start : start + n])
        b = restored.enqueue(extra[start : start + n])
        assert a == b
        start += n
        assert len(restored) == len(original)
        assert torch.equal(restored.features(), original.features())
        assert restored.total_written == original.total_written
        if len(original):
            idx = torch.arange(len(original)).flip(0)
            assert torch.equal(restored.gather(idx), original.gather(idx))


def test_state_dict_is_a_snapshot() -> None:
    pool = CaptionPool(3)
    pool.enqueue(_rows(3))
    state = pool.state_dict()
    saved = state["features"].clone()
    pool.enqueue(_rows(2, seed=5))
    assert torch.equal(state["features"], saved)


def test_load_keeps_rejected_and_bumps_generation() -> None:
    src = CaptionPool(4)
    data = _rows(3)
    data[0] = float("nan")
    with pytest.warns(RuntimeWarning):
        src.enqueue(data)
    dst = CaptionPool(4)
    dst.enqueue(_rows(4, seed=9))
    gen = dst.generation
    dst.load_state_dict(src.state_dict())
    assert dst.generation > gen
    assert dst.rejected == 1
    assert len(dst) == 2
    assert torch.equal(dst.features(), src.features())


def test_load_state_of_empty_pool() -> None:
    dst = CaptionPool(4)
    dst.enqueue(_rows(4))
    dst.load_state_dict(CaptionPool(4).state_dict())
    assert len(dst) == 0
    assert dst.segments() == []
    assert dst.total_written == 0


def test_load_into_pool_of_other_size_raises() -> None:
    src = CaptionPool(4)
    src.enqueue(_rows(2))
    with pytest.raises(ValueError, match="--roclip-pool-size") as info:
        CaptionPool(5).load_state_dict(src.state_dict())
    assert "4" in str(info.value) and "5" in str(info.value)


# -- slots_written_since -----------------------------------------------------------------------


def _by_slot(pool: CaptionPool) -> dict[int, torch.Tensor]:
    slots = pool.physical_slots(torch.arange(len(pool))).tolist()
    return dict(zip(slots, pool.features(), strict=True))


@given(case=feeds(), later=st.lists(st.integers(0, 20), max_size=5), seed2=st.integers(0, 2**31))
@SETTINGS
def test_slots_written_since(
    case: tuple[int, list[int], int], later: list[int], seed2: int
) -> None:
    size, batches, seed = case
    pool = CaptionPool(size)
    _feed_both(pool, Model(size), batches, seed)
    mark = pool.total_written
    before = _by_slot(pool)
    extra = _rows(max(sum(later), 1), seed=seed2)
    start = 0
    for n in later:
        pool.enqueue(extra[start : start + n])
        start += n
    new = pool.total_written - mark
    assert new == sum(later)
    slots = pool.slots_written_since(mark)
    if new >= size:
        assert slots is None
        return
    assert slots is not None
    assert slots.numel() == new
    assert len(set(slots.tolist())) == new
    assert all(0 <= s < size for s in slots.tolist())
    after = _by_slot(pool)
    # the returned slots hold the newest rows, oldest first
    if new:
        got = torch.stack([after[s] for s in slots.tolist()])
        _close(got, _normalised(extra[start - new : start]))
    # every other valid slot is unchanged
    for slot, row in after.items():
        if slot not in slots.tolist():
            assert torch.equal(row, before[slot])


def test_slots_written_since_edge_cases() -> None:
    pool = CaptionPool(5)
    pool.enqueue(_rows(4))
    assert pool.slots_written_since(pool.total_written).tolist() == []
    assert pool.slots_written_since(pool.total_written + 1) is None  # from the future
    pool.enqueue(_rows(3, seed=1))  # slot 4, then 0, 1
    assert pool.slots_written_since(4).tolist() == [4, 0, 1]
    assert pool.slots_written_since(2) is None  # 5 rows: every slot changed


# -- checksum ----------------------------------------------------------------------------------


@given(case=feeds(), split=st.data())
@SETTINGS
def test_checksum_equal_for_equal_content(
    case: tuple[int, list[int], int], split: st.DataObject
) -> None:
    size, batches, seed = case
    a = CaptionPool(size)
    data = _feed_both(a, Model(size), batches, seed)
    # b receives the same rows in one go, or split differently
    total = sum(batches)
    b = CaptionPool(size)
    cut = split.draw(st.integers(0, total))
    b.enqueue(data[:cut])
    b.enqueue(data[cut:total])
    if len(a) == 0:
        assert a.checksum() == b.checksum() == 0.0
        return
    assert torch.equal(a.features(), b.features())
    assert a.checksum() == b.checksum()


@given(seed=st.integers(0, 2**31), size=st.integers(2, 12), row=st.data())
@SETTINGS
def test_checksum_differs_for_different_content(seed: int, size: int, row: st.DataObject) -> None:
    data = _rows(size, seed=seed)
    a, b, c = CaptionPool(size), CaptionPool(size), CaptionPool(size)
    a.enqueue(data)
    changed = data.clone()
    i = row.draw(st.integers(0, size - 1))
    changed[i] = _rows(1, seed=seed + 1)[0]
    b.enqueue(changed)
    c.enqueue(data.flip(0))  # same rows, other order
    assert a.checksum() != b.checksum()
    assert a.checksum() != c.checksum()
    assert a.checksum() != CaptionPool(size).checksum()


def test_checksum_sees_more_than_row_sums() -> None:
    a, b = CaptionPool(2), CaptionPool(2)
    a.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    b.enqueue(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert not torch.equal(a.features(), b.features())
    assert a.checksum() != b.checksum()


# -- devices -----------------------------------------------------------------------------------


def test_explicit_cpu_device_and_to() -> None:
    pool = CaptionPool(3, device="cpu")
    pool.enqueue(_rows(2))
    assert pool.features().device.type == "cpu"
    assert pool.to("cpu") is pool
    assert pool.device == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip() -> None:
    data = _rows(7)
    pool = CaptionPool(5, device="cuda")
    pool.enqueue(data[:3])
    pool.enqueue(data[3:].cuda())
    assert pool.features().device.type == "cuda"
    _close(pool.features().cpu(), _normalised(data[2:]))
    state = pool.state_dict()
    assert state["features"].device.type == "cpu"
    restored = CaptionPool(5, device="cuda")
    restored.load_state_dict(state)
    assert restored.features().device.type == "cuda"
    assert torch.equal(restored.features().cpu(), pool.features().cpu())
    idx = torch.tensor([4, 0, 2], device="cuda")
    assert torch.equal(restored.gather(idx), pool.features()[idx])
    cpu_pool = CaptionPool(5)
    cpu_pool.load_state_dict(state)
    assert torch.equal(cpu_pool.features(), pool.features().cpu())
    pool.to("cpu")
    assert torch.equal(pool.features(), cpu_pool.features())
    assert pool.checksum() == cpu_pool.checksum()


def _filled_state() -> dict:
    pool = CaptionPool(8)
    pool.enqueue(torch.randn(5, 4))
    return pool.state_dict()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("features"), "pool state lacks 'features'"),
        (lambda s: s.update(size=9), "checkpoint pool size 9 differs"),
        (lambda s: s["features"].__setitem__((1, 2), math.nan), r"1 row\(s\) hold NaN or inf"),
        (lambda s: s["features"].mul_(3.0), "rows are not unit-norm"),
        (lambda s: s.update(features=torch.randn(9, 4)), r"features of shape \(9, 4\)"),
        (lambda s: s.update(dim=5), "do not fit a pool of size 8 and dim 5"),
        (lambda s: s.update(total_written=2), "total_written 2 is below the 5 rows"),
        (lambda s: s.update(rejected=-1), "'rejected' is -1"),
        (lambda s: s.update(features=[[1.0]]), "'features' is not a 2-D floating-point"),
    ],
)
def test_bad_pool_state_is_refused_and_leaves_the_pool_as_it_was(change, match) -> None:
    from roclip_plugin.io import StateError

    state = _filled_state()
    change(state)
    pool = CaptionPool(8)
    pool.enqueue(torch.randn(2, 4))
    before = pool.features().clone()
    with pytest.raises(StateError, match=match):
        pool.load_state_dict(state)
    assert torch.equal(pool.features(), before)


def test_numpy_and_tensor_sizes_are_integers() -> None:
    import numpy as np

    pool = CaptionPool(np.int64(4), dim=torch.tensor(3))
    assert (pool.size, pool.dim) == (4, 3) and type(pool.size) is int


def test_a_pool_larger_than_its_devices_memory_is_refused_before_it_is_allocated(
    monkeypatch,
) -> None:
    """Every entry point builds its buffer here: a pool of 2**24 x 32 float32 (2 GiB) on a
    device of 1 GiB fails at its first captions, naming the flag and the size that fits."""
    from roclip_plugin import checks

    monkeypatch.setattr(checks, "device_memory_bytes", lambda device=None: 2**30)
    pool = CaptionPool(2**24)
    with pytest.raises(ValueError, match=r"--roclip-pool-size 16777216: .* 2\.0 GiB .* 8388608"):
        pool.enqueue(torch.randn(4, 32))
    assert len(pool) == 0 and pool.dim is None
    CaptionPool(2**20).enqueue(torch.randn(4, 32))  # 128 MiB of 1 GiB: allowed
