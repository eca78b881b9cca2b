"""Nearest-caption search: each image's most similar pool caption, by cosine similarity.

The search is exhaustive and exact in float32, ties broken by the lowest (oldest) pool index,
and runs over the pool in chunks so memory stays bounded for pools of millions of rows. It runs
in the precision asked for whatever the caller's autocast (OpenCLIP computes its loss under
autocast, which would otherwise turn the float32 products into bf16 or fp16 ones).
``precision="bf16"`` searches with bfloat16 matrix products and then re-scores in float32
every candidate that a per-row error bound cannot rule out, so the float32 winner is always
among them. What either precision guarantees (:func:`float32_tolerance`): the returned row's
exact score is within float32 rounding of the best exact score; two rows whose scores differ
by less than that (about 1e-7 for unit vectors of a few hundred dimensions) may come back in
either order, and then fp32 and bf16 may disagree. Rows further apart always give the same
answer in both. The faiss backends run on the CPU: exact (``faiss``) or approximate
(``faiss-ivf``) for pools larger than device memory.

Cosine similarity is ``a.b / (|a| |b|)``. Pool rows are L2-normalised (the pool stores them so),
and dividing a row of scores by ``|a|`` does not change its argmax, so image rows are used as
given: scaling an image by any positive factor gives the same match (bit-exactly for powers of
two, up to float32 rounding of near-ties otherwise).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from roclip_plugin.pool import normalize_rows

if TYPE_CHECKING:
    from roclip_plugin.config import RoClipConfig
    from roclip_plugin.pool import CaptionPool

SCORE_BUDGET_BYTES = 256 * 2**20
MIN_CHUNK = 1024
MAX_CANDIDATES_PER_CHUNK = 256
_BF16_UNIT_ROUNDOFF = 2.0**-8


@runtime_checkable
class Matcher(Protocol):
    """Anything that maps image features and a pool to logical pool indices."""

    def __call__(self, image_features: torch.Tensor, pool: CaptionPool) -> torch.Tensor:
        """Return a LongTensor ``[batch]`` of indices into ``pool.features()`` (oldest first)."""
        ...


# -- public functional API ---------------------------------------------------------------------


def nearest_captions(
    image_features: torch.Tensor,
    pool_features: torch.Tensor | Sequence[torch.Tensor],
    *,
    precision: str = "fp32",
    chunk_size: int = 0,
    pool_normalized: bool = False,
) -> torch.Tensor:
    """Index of the most cosine-similar pool row for each image row.

    Args:
        image_features: ``[batch, dim]``, any float dtype; not modified.
        pool_features: ``[pool, dim]``, or a sequence of such segments read as their
            concatenation (the pool passes its ring buffer as two views, avoiding a copy).
        precision: ``"fp32"`` or ``"bf16"`` (bf16 search, certified fp32 re-scoring).
        chunk_size: pool rows per chunk; 0 bounds each chunk's score matrix to ~256 MiB.
        pool_normalized: set when pool rows are already unit-norm, to skip normalising them.

    Returns:
        LongTensor ``[batch]`` on the image device. Ties go to the lowest index.
    """
    segments = _as_segments(pool_features)
    total = sum(s.shape[0] for s in segments)
    _check_shapes(image_features, segments, total)
    if precision not in ("fp32", "bf16"):
        raise ValueError(
            f"precision (--roclip-precision): invalid value {precision!r}; allowed: fp32, bf16"
        )
    check_finite_queries(image_features)
    images = image_features.detach().float()
    chunk = chunk_size or _auto_chunk(images.shape[0], total)
    with autocast_disabled(images.device, *(s.device for s in segments)):
        if not pool_normalized:
            segments = [normalize_rows(s) for s in segments]
        if precision == "fp32":
            return _search_fp32(images, segments, chunk)
        return _search_bf16(images, segments, chunk)


def brute_force_nearest(image_features: torch.Tensor, pool_features: torch.Tensor) -> torch.Tensor:
    """Reference: one float32 product, first index of the row maximum. For tests and contracts."""
    with autocast_disabled(image_features.device, pool_features.device):
        pool = normalize_rows(pool_features)
        with highest_matmul_precision():
            scores = image_features.float() @ pool.T
    return _first_argmax(scores)


def float32_tolerance(image_features: torch.Tensor) -> torch.Tensor:
    """Per image row, how far below the best exact score a returned row's score may lie.

    Every exact matcher (fp32, bf16 with re-scoring, faiss) computes float32 dot products, each
    within ``dim * 2^-24 * |a|`` of the exact one for unit-norm pool rows: a returned row may
    therefore trail the true best by twice that, ``|a| * dim * 2^-23``. When the best row leads
    every other by more, every exact matcher returns it.
    """
    images = image_features.detach().float()
    return images.norm(dim=1) * images.shape[1] * 2.0**-23


def check_finite_queries(image_features: torch.Tensor) -> None:
    """Refuse NaN or infinite image rows, as the pool refuses such captions.

    Their scores are NaN, so a search would silently return row 0 (torch) or an arbitrary row
    (faiss). One device synchronisation, paid only by matching steps.
    """
    finite = torch.isfinite(image_features).all(dim=1)
    bad = int((~finite).sum())
    if bad:
        raise ValueError(
            f"{bad} of {image_features.shape[0]} image feature rows are non-finite (NaN or "
            "inf); they cannot be matched to a pool caption. The image tower diverged: lower "
            "the learning rate, clip gradients (OpenCLIP: --grad-clip-norm) or train in a "
            "wider precision (--precision amp_bf16 or fp32)"
        )


# -- building blocks ---------------------------------------------------------------------------


def _as_segments(pool: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [pool] if isinstance(pool, torch.Tensor) else list(pool)


def _check_shapes(images: torch.Tensor, segments: list[torch.Tensor], total: int) -> None:
    if images.ndim != 2:
        raise ValueError(f"image_features must be [batch, dim], got {tuple(images.shape)}")
    if total == 0:
        raise ValueError("the caption pool is empty: nothing to match against; enqueue first")
    for seg in segments:
        if seg.ndim != 2 or seg.shape[1] != images.shape[1]:
            raise ValueError(
                f"pool features must be [pool, {images.shape[1]}] to match image features "
                f"{tuple(images.shape)}, got {tuple(seg.shape)}"
            )


def _auto_chunk(batch: int, total: int) -> int:
    return max(MIN_CHUNK, min(total, SCORE_BUDGET_BYTES // (4 * max(batch, 1))))


@contextlib.contextmanager
def autocast_disabled(*devices: torch.device | str) -> Iterator[None]:
    """Turn autocast off for the types of ``devices`` (the caller's autocast is restored after).

    Trainers compute the loss under ``torch.autocast`` (OpenCLIP does for every ``--precision
    amp*``), which would run the search's float32 products in bf16 or fp16: the search must run
    in the precision it was asked for, whatever the ambient autocast.
    """
    types = dict.fromkeys(torch.device(d).type for d in devices)
    with contextlib.ExitStack() as stack:
        for device_type in types:
            if _autocast_available(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def _autocast_available(device_type: str) -> bool:
    check = getattr(torch.amp, "is_autocast_available", None)
    return device_type in ("cpu", "cuda") if check is None else bool(check(device_type))


@contextlib.contextmanager
def highest_matmul_precision() -> Iterator[None]:
    """Run float32 products in true float32 (no TF32) and bf16 products with fp32 reductions.

    Trainers often enable TF32 globally (OpenCLIP does); an exact search must not inherit it.
    Torch has two APIs for this setting, and after a trainer used the newer per-backend one
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, torch >= 2.9) the legacy getter
    ``torch.get_float32_matmul_precision()`` raises: the setting is then read, set and
    restored per backend (:func:`_ieee_per_backend`).
    """
    cuda_matmul = torch.backends.cuda.matmul
    old_reduced = cuda_matmul.allow_bf16_reduced_precision_reduction
    try:
        old_precision: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # the per-backend API is in use: the global value is undefined
        old_precision = None
    with contextlib.ExitStack() as stack:
        if old_precision is None:
            stack.enter_context(_ieee_per_backend())
        else:
            torch.set_float32_matmul_precision("highest")
            stack.callback(torch.set_float32_matmul_precision, old_precision)
        cuda_matmul.allow_bf16_reduced_precision_reduction = False
        stack.callback(setattr, cuda_matmul, "allow_bf16_reduced_precision_reduction", old_reduced)
        yield


def _matmul_backends() -> list[Any]:
    """The backends whose float32 matmul precision torch's newer API sets one by one."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    backends = [torch.backends.cuda.matmul, getattr(mkldnn, "matmul", None)]
    return [b for b in backends if b is not None and hasattr(b, "fp32_precision")]


@contextlib.contextmanager
def _ieee_per_backend() -> Iterator[None]:
    """Set every backend's ``fp32_precision`` to ``"ieee"``, then restore each exactly."""
    backends = _matmul_backends()
    saved = [b.fp32_precision for b in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value


def _first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Argmax per row, first index of the maximum, spelled out (the independent reference)."""
    best = scores.max(dim=1, keepdim=True).values
    cols = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return torch.where(scores == best, cols, scores.shape[1]).min(dim=1).values


def _chunks(segments: list[torch.Tensor], chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    offset = 0
    for seg in segments:
        for start in range(0, seg.shape[0], chunk):
            yield offset + start, seg[start : start + chunk]
        offset += seg.shape[0]


def _search_fp32(images: torch.Tensor, segments: list[torch.Tensor], chunk: int) -> torch.Tensor:
    best_val = torch.full((images.shape[0],), float("-inf"), device=images.device)
    best_idx = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    with highest_matmul_precision():
        for offset, block in _chunks(segments, chunk):
            scores = images @ block.to(images.device, torch.float32).T
            val, idx = scores.max(dim=1)  # documented: the first maximal index
            idx = idx + offset
            better = val > best_val  # strict: an earlier chunk keeps its tie
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx


def _bf16_error_bound(images: torch.Tensor) -> torch.Tensor:
    """Per-row bound on |bf16 score - exact score| against unit-norm pool rows.

    Rounding both operands to bf16 (2u), the bf16 output (u), and float32 accumulation over
    ``dim`` terms, with a safety factor: ``|a| (4u + dim 2^-23)``.
    """
    dim = images.shape[1]
    return images.norm(dim=1) * (4 * _BF16_UNIT_ROUNDOFF + dim * 2.0**-23)


def _search_bf16(images: torch.Tensor, segments: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """bf16 scan for the row maxima, then float32 re-scoring of every row within the bound.

    Pass 1 finds each image's best bf16 score ``m``. The float32 winner's bf16 score is at least
    ``m - 2 delta`` (both scores are within ``delta`` of the truth), so pass 2 re-scores, in
    float32, exactly the pool rows whose bf16 score reaches that threshold. Images with more
    than :data:`MAX_CANDIDATES_PER_CHUNK` such rows in a chunk (a near-collapsed pool) are
    searched again in float32 instead.
    """
    queries = images.bfloat16()
    threshold = _bf16_row_max(queries, segments, chunk) - 2 * _bf16_error_bound(images)
    best_val = torch.full((images.shape[0],), float("-inf"), device=images.device)
    best_idx = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    dense = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    with highest_matmul_precision():
        for offset, block in _chunks(segments, chunk):
            block = block.to(images.device)
            scores = (queries @ block.bfloat16().T).float()
            mask = scores >= threshold.unsqueeze(1)
            crowded = mask.sum(dim=1) > MAX_CANDIDATES_PER_CHUNK
            dense |= crowded
            mask &= ~crowded.unsqueeze(1)
            rows, cols = mask.nonzero(as_tuple=True)
            exact = (images[rows] * block[cols].float()).sum(dim=-1)
            val, idx = _segment_best(exact, rows, cols + offset, images.shape[0])
            better = val > best_val  # strict: an earlier chunk keeps its tie
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    if bool(dense.any()):
        best_idx[dense] = _search_fp32(images[dense], segments, chunk)
    return best_idx


def _bf16_row_max(queries: torch.Tensor, segments: list[torch.Tensor], chunk: int) -> torch.Tensor:
    best = torch.full((queries.shape[0],), float("-inf"), device=queries.device)
    with highest_matmul_precision():
        for _, block in _chunks(segments, chunk):
            scores = queries @ block.to(queries.device, torch.bfloat16).T
            best = torch.maximum(best, scores.max(dim=1).values.float())
    return best


def _segment_best(
    values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the maximum of ``values`` and the lowest column attaining it."""
    best = torch.full((n_rows,), float("-inf"), device=values.device)
    best = best.scatter_reduce(0, rows, values, reduce="amax")
    top = values == best[rows]
    big = torch.iinfo(torch.long).max
    idx = torch.full((n_rows,), big, dtype=torch.long, device=values.device)
    idx = idx.scatter_reduce(0, rows[top], cols[top], reduce="amin")
    return best, idx


# -- matcher objects ---------------------------------------------------------------------------


class TorchMatcher:
    """Exact search on the pool's own device (the default; a GPU scan for GPU training)."""

    def __init__(self, precision: str = "fp32", chunk_size: int = 0) -> None:
        self.precision = precision
        self.chunk_size = chunk_size

    def __call__(self, image_features: torch.Tensor, pool: CaptionPool) -> torch.Tensor:
        """Match against the pool's ring buffer views, without copying them."""
        segs = pool.segments()
        images = image_features.to(segs[0].device) if segs else image_features
        idx = nearest_captions(
            images,
            segs,
            precision=self.precision,
            chunk_size=self.chunk_size,
            pool_normalized=True,
        )
        return idx.to(image_features.device)


def _import_faiss() -> Any:
    try:
        return importlib.import_module("faiss")
    except ImportError as err:  # pragma: no cover - exercised when faiss is absent
        raise ImportError(
            "--roclip-matcher faiss / faiss-ivf needs faiss-cpu, which is not installed: "
            "pip install 'roclip-plugin[faiss]' (or choose --roclip-matcher torch)"
        ) from err


class FaissMatcher:
    """Exact inner-product search with faiss on the CPU (``faiss.knn``, no index to build).

    It asks faiss for a few candidates per segment and applies the lowest-index tie rule; a row
    whose candidates are all tied (more ties may exist) is searched again with the torch scan.
    """

    candidates = 8

    def __init__(self) -> None:
        self._faiss = _import_faiss()

    def __call__(self, image_features: torch.Tensor, pool: CaptionPool) -> torch.Tensor:
        """Search each pool segment with faiss, merge, then apply the tie rule."""
        faiss = self._faiss
        check_finite_queries(image_features)
        queries = image_features.detach().float().cpu().contiguous().numpy()
        vals, idxs, offset = [], [], 0
        for seg in pool.segments():
            base = seg.detach().cpu().contiguous().numpy()
            k = min(self.candidates, base.shape[0])
            dist, ind = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
            vals.append(torch.from_numpy(dist))
            idxs.append(torch.from_numpy(ind).long() + offset)
            offset += base.shape[0]
        if not vals:
            raise ValueError("the caption pool is empty: nothing to match against; enqueue first")
        val, idx = torch.cat(vals, dim=1), torch.cat(idxs, dim=1)
        answer = _tie_rule(val, idx)
        saturated = (val == val.max(dim=1, keepdim=True).values).sum(dim=1) >= min(
            self.candidates, len(pool)
        )
        saturated &= len(pool) > self.candidates
        if bool(saturated.any()):
            exact = TorchMatcher()(image_features.detach().cpu()[saturated], pool)
            answer[saturated] = exact.cpu()
        return answer.to(image_features.device)


def _tie_rule(val: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    top = val.max(dim=1, keepdim=True).values
    big = torch.iinfo(torch.long).max
    return torch.where(val == top, idx, big).min(dim=1).values


class FaissIVFMatcher:
    """Approximate search with a faiss inverted-file index kept in step with the pool.

    The index holds one entry per physical pool slot (its id); each call removes the slots the
    pool overwrote since the last call and adds their new rows, so a step costs the new rows,
    not the pool. Until the pool holds ``nlist`` rows the index cannot be trained and the exact
    scan answers instead. Approximate: answers may differ from the exact search.
    """

    def __init__(self, nlist: int = 1024, nprobe: int = 32, seed: int = 0) -> None:
        self._faiss = _import_faiss()
        self.nlist = nlist
        self.nprobe = nprobe
        self.seed = seed
        self._index: Any = None
        self._synced: tuple[int, int] = (-1, -1)  # (pool generation, total_written)

    def __call__(self, image_features: torch.Tensor, pool: CaptionPool) -> torch.Tensor:
        """Sync the index with the pool, then search it (exact scan while untrained)."""
        if len(pool) < self.nlist:
            return TorchMatcher()(image_features, pool)
        check_finite_queries(image_features)
        self._sync(pool)
        queries = image_features.detach().float().cpu().contiguous().numpy()
        _, slots = self._index.search(queries, 1)
        slots_t = torch.from_numpy(slots[:, 0]).long()
        answer = (slots_t - pool.oldest_slot) % pool.size
        missed = slots_t < 0  # every probed list was empty for this query
        if bool(missed.any()):
            answer[missed] = TorchMatcher()(image_features.detach().cpu()[missed], pool).cpu()
        return answer.to(image_features.device)

    def _sync(self, pool: CaptionPool) -> None:
        changed = None
        if self._index is not None and self._synced[0] == pool.generation:
            changed = pool.slots_written_since(self._synced[1])
        if self._index is None or self._synced[0] != pool.generation:
            self._index = self._train(pool)
        if changed is None:
            self._index.reset()
            slots = pool.physical_slots(torch.arange(len(pool)))
        else:
            slots = changed
            self._index.remove_ids(slots.numpy().astype("int64"))
        if slots.numel():
            rows = pool.gather((slots - pool.oldest_slot) % pool.size).cpu().numpy()
            self._index.add_with_ids(rows, slots.numpy().astype("int64"))
        self._index.nprobe = self.nprobe
        self._synced = (pool.generation, pool.total_written)

    def _train(self, pool: CaptionPool) -> Any:
        faiss = self._faiss
        dim = int(pool.dim or 0)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.train(pool.features().cpu().numpy())
        self._quantizer = quantizer  # the index borrows it: keep it alive as long as the index
        return index


def check_matcher_settings(config: RoClipConfig) -> None:
    """Refuse search settings the chosen matcher would ignore, naming both flags.

    The faiss backends search in float32 on the CPU with faiss's own blocking: a bf16 search
    or a chunk size given with them would be silently dropped, and a user comparing runs would
    believe they changed something. The torch scan honours both.
    """
    if config.matcher == "torch":
        return
    ignored = []
    if config.precision != "fp32":
        ignored.append(f"--roclip-precision {config.precision}")
    if config.match_chunk_size:
        ignored.append(f"--roclip-match-chunk-size {config.match_chunk_size}")
    if ignored:
        raise ValueError(
            f"{' and '.join(ignored)}: --roclip-matcher {config.matcher} searches in float32 "
            "with faiss's own blocking and would ignore it; drop it, or use --roclip-matcher "
            "torch"
        )


def make_matcher(config: RoClipConfig) -> Matcher:
    """The built-in matcher that ``config.matcher`` names (refusing settings it would ignore)."""
    check_matcher_settings(config)
    if config.matcher == "torch":
        return TorchMatcher(config.precision, config.match_chunk_size)
    if config.matcher == "faiss":
        return FaissMatcher()
    return FaissIVFMatcher(config.ivf_nlist, config.ivf_nprobe, config.seed)
