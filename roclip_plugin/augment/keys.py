"""Per-sample randomness for augmentations: a counter-based hash of (seed, epoch, index).

An augmentation of sample ``i`` in epoch ``e`` must not depend on which DataLoader worker or
rank loads it, nor on what was drawn before it: global random state (``torch.rand``,
``random.random``) depends on both. Every random number is therefore a hash of
``(seed, epoch, sample index, stream, slot)``: the same on every worker, rank, device and run.

The hash is built from 32-bit multiply-xorshift rounds written with operators that Python ints
and int64 tensors share, and whose intermediate values stay below 2**49, so one function gives
bit-identical numbers for a single sample (the CPU path) and for a whole batch at once (the
batched path) without int64 overflow.

When no sample index is passed, :func:`current_sample_index` (set by :class:`IndexedDataset`
around ``__getitem__``) provides it; failing that, a per-process call counter mixed with the
DataLoader worker id and the rank stands in, which is reproducible only for a fixed number of
workers and ranks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

from roclip_plugin.distributed import launch_rank

M32 = 0xFFFFFFFF
STREAM_IMAGE = 0x1A6E
STREAM_TEXT = 0x7E87
STREAM_PLUGIN = 0x9106
REFRESH = ("epoch", "run")
_GOLDEN = 0x9E3779B9
_LANE_B = 0x85EBCA6B
_COUNTER_SALT = 0xC0FFEE11

IntOrTensor = TypeVar("IntOrTensor", int, torch.Tensor)


def mul32(x: IntOrTensor, constant: int) -> IntOrTensor:
    """``x * constant mod 2**32`` for ``x < 2**32``, in two 16-bit halves (no int64 overflow)."""
    low = constant & 0xFFFF
    high = constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & M32


def mix32(x: IntOrTensor) -> IntOrTensor:
    """A 32-bit avalanche hash (xorshift-multiply rounds with well-tested constants)."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_lanes(
    seed: int, epoch: int, index: IntOrTensor, stream: int
) -> tuple[IntOrTensor, IntOrTensor]:
    """Two independent 32-bit hashes of ``(seed, epoch, index, stream)`` (64 bits of key).

    ``index`` is an int or an int64 tensor of non-negative sample indices.
    """
    words = (seed & M32, (seed >> 32) & M32, epoch & M32, stream & M32)
    lanes = []
    for start in (_GOLDEN, _LANE_B):
        h = start
        for word in words:
            h = mix32(h ^ word)
        lane = mix32((index & M32) ^ h)
        lanes.append(mix32(lane ^ ((index >> 32) & M32)))
    return lanes[0], lanes[1]


def slot_bits(a: IntOrTensor, b: IntOrTensor, slot: IntOrTensor) -> IntOrTensor:
    """32 random bits for draw number ``slot`` of the sample keyed by lanes ``(a, b)``."""
    return mix32(mix32(a ^ mul32(slot + 1, _GOLDEN)) ^ b)


def uniforms(seed: int, epoch: int, indices: torch.Tensor, stream: int, slots: int) -> torch.Tensor:
    """``(B, slots)`` float64 uniforms in [0, 1) for each sample index of ``indices`` (CPU)."""
    idx = indices.to(device="cpu", dtype=torch.int64).reshape(-1, 1)
    if bool((idx < 0).any()):
        raise ValueError("sample indices must be non-negative")
    a, b = sample_lanes(seed, epoch, idx, stream)
    bits = slot_bits(a, b, torch.arange(slots, dtype=torch.int64).reshape(1, -1))
    return bits.to(torch.float64) / 4294967296.0


def python_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    """A 64-bit seed for ``random.Random`` or ``torch.Generator`` for one sample."""
    if index < 0:
        raise ValueError(f"sample index must be non-negative, got {index}")
    a, b = sample_lanes(seed, epoch, index, stream)
    return (a << 32) | b


# -- the epoch, shared with DataLoader workers ----------------------------------------------


class EpochCell:
    """An epoch number that DataLoader workers read live, even persistent ones.

    It lives in a shared-memory tensor: workers started by ``fork`` inherit the mapping, and
    workers started by ``spawn`` receive a handle to the same memory (PyTorch's multiprocessing
    pickler), so ``set`` in the main process is seen by every worker without restarting them.
    Pickled outside multiprocessing (``pickle.dumps``), it becomes a private copy.
    """

    def __init__(self, epoch: int = 0) -> None:
        self._value = torch.zeros((), dtype=torch.int64)
        with contextlib.suppress(RuntimeError):  # no shared memory: workers see a snapshot
            self._value.share_memory_()
        self.set(epoch)

    def get(self) -> int:
        """The current epoch."""
        return int(self._value.item())

    def set(self, epoch: int) -> None:
        """Set the epoch (call before iterating the epoch's DataLoader)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._value.fill_(epoch)


# -- sample indices -------------------------------------------------------------------------

_SAMPLE_INDEX: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "roclip_sample_index", default=None
)


def current_sample_index() -> int | None:
    """The index set by :func:`sample_index` (or :class:`IndexedDataset`), if any."""
    return _SAMPLE_INDEX.get()


@contextlib.contextmanager
def sample_index(index: int) -> Iterator[None]:
    """Within this block, augmentations called without an index use ``index``."""
    token = _SAMPLE_INDEX.set(int(index))
    try:
        yield
    finally:
        _SAMPLE_INDEX.reset(token)


class IndexedDataset:
    """Wrap a map-style dataset so that its transforms know the sample index.

    Dataset code calls ``transform(image)`` without an index (OpenCLIP's ``CsvDataset`` does);
    this wrapper sets :func:`current_sample_index` around ``dataset[index]``, which makes the
    augmentation of every sample reproducible whatever the number of workers or ranks.
    Other attributes are forwarded to the wrapped dataset.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with sample_index(index):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # during unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.dataset, name)


# -- keys -----------------------------------------------------------------------------------


def _worker_and_rank() -> tuple[int, int]:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    worker = info.id if info is not None else 0
    return worker, launch_rank()


class KeyMaker:
    """Turns (epoch, index) into hash keys for one kind of augmentation.

    Args:
        seed: the run's augmentation seed.
        refresh: ``epoch`` (a new draw each epoch) or ``run`` (epoch 0 always: the same
            augmentation of a sample all run long).
        stream: separates image, text and plugin draws.
        epoch_cell: where the current epoch is read when none is passed.
    """

    def __init__(self, seed: int, refresh: str, stream: int, epoch_cell: EpochCell) -> None:
        if refresh not in REFRESH:
            raise ValueError(f"refresh must be one of {', '.join(REFRESH)}, got {refresh!r}")
        self.seed = seed
        self.refresh = refresh
        self.stream = stream
        self.epoch_cell = epoch_cell
        self._count = 0
        self._count_epoch: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_count"], state["_count_epoch"] = 0, None  # each process counts on its own
        return state

    def epoch(self, epoch: int | None = None) -> int:
        """The epoch that keys use: the given or current one, or 0 under ``run``."""
        current = self.epoch_cell.get() if epoch is None else epoch
        return current if self.refresh == "epoch" else 0

    def _take(self, count: int) -> tuple[int, int]:
        """``count`` counter values and the stream salted with worker and rank."""
        epoch = self.epoch_cell.get()
        if epoch != self._count_epoch:
            self._count, self._count_epoch = 0, epoch
        first = self._count
        self._count += count
        worker, rank = _worker_and_rank()
        salted = mix32(mix32(self.stream ^ _COUNTER_SALT) ^ (worker & 0xFFFF) ^ (rank << 16))
        return first, salted

    def key(self, index: int | None = None, epoch: int | None = None) -> tuple[int, int, int, int]:
        """``(seed, epoch, index, stream)`` for one sample."""
        if index is None:
            index = current_sample_index()
        stream = self.stream
        if index is None:
            index, stream = self._take(1)
        return self.seed, self.epoch(epoch), int(index), stream

    def batch(
        self, count: int, indices: torch.Tensor | None = None, epoch: int | None = None
    ) -> tuple[int, int, torch.Tensor, int]:
        """``(seed, epoch, indices, stream)`` for a batch of ``count`` samples."""
        stream = self.stream
        if indices is None:
            first, stream = self._take(count)
            indices = torch.arange(first, first + count, dtype=torch.int64)
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if indices.numel() != count:
            raise ValueError(f"{indices.numel()} sample indices for a batch of {count}")
        return self.seed, self.epoch(epoch), indices, stream

    def keys(
        self, count: int, indices: Sequence[int] | None = None, epoch: int | None = None
    ) -> list[tuple[int, int, int, int]]:
        """Keys for ``count`` samples.

        The given indices; else the current sample index for a single sample; else
        consecutive counter values.
        """
        if indices is not None:
            indices = [int(i) for i in indices]
            if len(indices) != count:
                raise ValueError(f"{len(indices)} sample indices for {count} samples")
            return [self.key(i, epoch) for i in indices]
        if count == 1:
            return [self.key(None, epoch)]
        first, stream = self._take(count)
        return [(self.seed, self.epoch(epoch), first + i, stream) for i in range(count)]
