"""The caption pool: a device-resident FIFO ring buffer of normalised text embeddings.

Unlike the authors' pool (and lightly's memory bank), it never drops the tail of a batch at
wrap-around, never matches slots that were never written, refuses non-finite rows, and saves
and restores its exact content so a resumed run continues with the same pool.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


def normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """L2-normalise non-zero finite rows into float32, whatever their scale or dtype.

    Each row is first divided by its largest absolute entry (in float64 for float64 input,
    else in float32), so neither the sum of squares of a huge row overflows nor a tiny row falls
    under ``F.normalize``'s epsilon (a float64 row beyond float32's range would otherwise become
    inf, then NaN).
    """
    work = rows if rows.dtype == torch.float64 else rows.float()
    peak = work.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(work.dtype).tiny)
    return F.normalize((work / peak).to(torch.float32), dim=-1)


class CaptionPool:
    """FIFO ring buffer of detached, L2-normalised caption embeddings.

    Storage is allocated lazily on the first :meth:`enqueue` (its dimension and device are
    taken from that batch unless given here), so an integration need not know the embedding
    width in advance. Rows are stored in float32 whatever the input dtype.

    Logical order is oldest first: index ``i`` of :meth:`features` is the ``i``-th oldest valid
    row. Matchers and :meth:`gather` use that order, so "lowest index" means "oldest".
    """

    def __init__(
        self, size: int, dim: int | None = None, device: torch.device | str | None = None
    ) -> None:
        from roclip_plugin.validation import as_integer

        number = as_integer(size)  # NumPy and 0-d tensor integers too, as in RoClipConfig
        if number is None or number < 1:
            raise ValueError(f"CaptionPool size: invalid value {size!r}; allowed: an integer >= 1")
        width = None if dim is None else as_integer(dim)
        if dim is not None and (width is None or width < 1):
            raise ValueError(f"CaptionPool dim: invalid value {dim!r}; allowed: an integer >= 1")
        self.size = number
        self.dim = width
        self.device = torch.device(device) if device is not None else None
        self._device_given = device is not None
        self._buffer: torch.Tensor | None = None
        self._next = 0  # physical slot the next row goes to
        self._count = 0  # valid rows, at most size
        self.total_written = 0  # rows ever stored; lets matchers with their own index sync
        self.rejected = 0  # non-finite rows refused
        self.generation = 0  # bumped when content is replaced wholesale (clear, load)
        self._warned = False
        if dim is not None and device is not None:
            self._allocate(dim, self.device)

    # -- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def is_full(self) -> bool:
        """Whether every slot holds a valid row."""
        return self._count == self.size

    @property
    def oldest_slot(self) -> int:
        """Physical slot of the oldest valid row."""
        return (self._next - self._count) % self.size

    def segments(self) -> list[torch.Tensor]:
        """Valid rows as at most two views of the buffer, in logical (oldest-first) order.

        Views, not copies: a matcher scanning a large pool on a GPU should not pay for a
        rolled copy of it every step.
        """
        if self._buffer is None or self._count == 0:
            return []
        start = self.oldest_slot
        end = start + self._count
        if end <= self.size:
            return [self._buffer[start:end]]
        return [self._buffer[start:], self._buffer[: end - self.size]]

    def features(self) -> torch.Tensor:
        """Valid rows, oldest first (a new tensor; shape ``[len(self), dim]``)."""
        segs = self.segments()
        if not segs:
            return torch.empty(0, self.dim or 0, device=self.device)
        return segs[0].clone() if len(segs) == 1 else torch.cat(segs)

    def physical_slots(self, indices: torch.Tensor) -> torch.Tensor:
        """Map logical indices (oldest first) to physical buffer slots."""
        return (indices + self.oldest_slot) % self.size

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows at logical ``indices`` (as returned by a matcher), without copying the pool."""
        if self._buffer is None:
            raise RuntimeError("CaptionPool.gather: the pool is empty; enqueue captions first")
        idx = indices.to(self._buffer.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._count):
            raise IndexError(
                f"CaptionPool.gather: indices must lie in [0, {self._count}), got "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        return self._buffer[self.physical_slots(idx)]

    def slots_written_since(self, total_written: int) -> torch.Tensor | None:
        """Physical slots overwritten since ``total_written`` rows; None if all changed."""
        new = self.total_written - total_written
        if new >= self.size or new < 0:
            return None
        first = (self._next - new) % self.size
        return (torch.arange(new) + first) % self.size

    # -- updates -------------------------------------------------------------------------

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor) -> int:
        """Append a batch of embeddings, newest last; returns how many rows were accepted.

        Rows are detached, L2-normalised (overflow-proof, see :func:`normalize_rows`) and
        stored in float32. Non-finite and zero rows are refused (counted in :attr:`rejected`,
        warned about once). A batch larger than the pool keeps only its newest ``size`` rows
        (all are counted as accepted); a batch crossing the end of the buffer wraps to the front.
        """
        if features.ndim != 2:
            raise ValueError(
                f"CaptionPool.enqueue: expected features of shape [batch, dim], got "
                f"{tuple(features.shape)}"
            )
        if self.dim is not None and features.shape[1] != self.dim:
            raise ValueError(
                f"CaptionPool.enqueue: features have dim {features.shape[1]} but the pool holds "
                f"dim {self.dim}; one pool serves one embedding width"
            )
        rows = self._finite_rows(features.detach())
        if rows.shape[0] == 0:
            return 0
        if self._buffer is None:
            self._allocate(rows.shape[1], self.device or rows.device)
        assert self._buffer is not None
        stored = rows.shape[0]
        self._write(normalize_rows(rows[-self.size :].to(self._buffer.device)))
        self.total_written += stored
        return stored

    def _finite_rows(self, features: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(features).all(dim=1) & (features.abs().amax(dim=1) > 0)
        bad = int((~finite).sum())
        if bad == 0:
            return features
        self.rejected += bad
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"CaptionPool: refused {bad} caption embedding(s) that were non-finite or zero; "
                "they are not stored (see pool.rejected for the running count). This usually "
                "means the text tower diverged: check the learning rate and precision.",
                RuntimeWarning,
                stacklevel=3,
            )
        return features[finite]

    def _write(self, rows: torch.Tensor) -> None:
        assert self._buffer is not None
        n = rows.shape[0]
        first = min(n, self.size - self._next)
        self._buffer[self._next : self._next + first] = rows[:first]
        if n > first:
            self._buffer[: n - first] = rows[first:]
        self._next = (self._next + n) % self.size
        self._count = min(self.size, self._count + n)

    def _allocate(self, dim: int, device: torch.device | None) -> None:
        """Make the buffer, once its width is known.

        A buffer larger than the memory of its device is refused first, naming the size that
        fits: every entry point builds its pool here, so none can start a 256 GB allocation or
        drive the machine into swap.
        """
        from roclip_plugin import checks

        target = torch.device(device) if device is not None else torch.device("cpu")
        checks.check_pool_fits(self.size, dim, checks.device_memory_bytes(str(target)))
        self.dim = dim
        self.device = target
        self._buffer = torch.zeros(self.size, dim, dtype=torch.float32, device=self.device)

    def follow(self, device: torch.device) -> None:
        """Move to ``device`` unless a device was given at construction.

        A pool restored from a checkpoint before the first step lands on the CPU; following
        the features keeps it on the training device instead of copying it every step.
        """
        if not self._device_given and self.device is not None and self.device != device:
            self.to(device)

    def to(self, device: torch.device | str) -> CaptionPool:
        """Move the storage to ``device`` (in place; returns self)."""
        self.device = torch.device(device)
        if self._buffer is not None:
            self._buffer = self._buffer.to(self.device)
        return self

    def clear(self) -> None:
        """Forget every row (storage is kept)."""
        self._next = 0
        self._count = 0
        self.generation += 1

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Exact content (valid rows, oldest first, on CPU) and counters."""
        return {
            "size": self.size,
            "dim": self.dim,
            "features": self.features().cpu(),
            "total_written": self.total_written,
            "rejected": self.rejected,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, onto this pool's device (or the CPU if unset).

        The state is checked whole before anything changes (raising
        :class:`~roclip_plugin.io.StateError`): a pool of another size, rows that are not finite
        or not unit-norm, or counters that disagree with the rows would make a resumed run
        silently different from the one that was saved.
        """
        rows, dim = _checked_pool_state(state, self.size)
        self.clear()
        if dim is not None:
            self._allocate(dim, self.device)
            self._write(rows.to(self.device, torch.float32))
        self.total_written = int(state["total_written"])
        self.rejected = int(state["rejected"])

    def checksum(self) -> float:
        """Cheap content fingerprint (rows weighted by position and column), to compare ranks."""
        feats = self.features().double()
        if feats.numel() == 0:
            return 0.0
        cols = torch.arange(1, feats.shape[1] + 1, dtype=torch.float64, device=feats.device)
        rows = torch.arange(1, feats.shape[0] + 1, dtype=torch.float64, device=feats.device)
        return float(((feats * cols).sum(dim=1) * rows).sum())


STATE_NORM_TOLERANCE = 1e-3  # stored rows were normalised in float32


def check_pool_state(state: Any, size: int) -> None:
    """Raise :class:`~roclip_plugin.io.StateError` if ``state`` cannot restore a pool of ``size``.

    What :meth:`CaptionPool.load_state_dict` checks, without a pool: a trainer can refuse a
    bad ``--resume`` before it builds its model and data.
    """
    _checked_pool_state(state, size)


def _checked_pool_state(state: Any, size: int) -> tuple[torch.Tensor, int | None]:
    """The rows and dim of a pool state, after checking it against a pool of ``size``."""
    from roclip_plugin.io import StateError
    from roclip_plugin.validation import POOL_STATE_KEYS, as_integer, check_state_keys

    state = check_state_keys(state, POOL_STATE_KEYS, "pool state")
    saved_size = as_integer(state["size"])
    if saved_size != size:
        raise StateError(
            f"CaptionPool.load_state_dict: checkpoint pool size {state['size']!r} differs from "
            f"this pool's {size}; resume with the same --roclip-pool-size"
        )
    dim, rows = state["dim"], state["features"]
    if dim is not None and (as_integer(dim) is None or as_integer(dim) < 1):
        raise StateError(f"pool state: dim {dim!r} is not a positive integer")
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or not rows.dtype.is_floating_point:
        raise StateError("pool state: 'features' is not a 2-D floating-point tensor of rows")
    if rows.shape[0] > size or (dim is not None and rows.shape[0] and rows.shape[1] != dim):
        raise StateError(
            f"pool state: features of shape {tuple(rows.shape)} do not fit a pool of size "
            f"{size} and dim {dim}"
        )
    if rows.shape[0] and dim is None:
        raise StateError("pool state: rows are saved but 'dim' is None")
    if rows.numel():
        norms = torch.linalg.vector_norm(rows.double(), dim=-1)
        if not bool(torch.isfinite(norms).all()):
            bad = int((~torch.isfinite(norms)).sum())
            raise StateError(f"pool state: {bad} row(s) hold NaN or inf; the file is corrupt")
        worst = float((norms - 1).abs().max())
        if worst > STATE_NORM_TOLERANCE:
            raise StateError(
                f"pool state: rows are not unit-norm (a norm differs from 1 by {worst:.3g}); "
                "the file was not written by CaptionPool.state_dict() or is corrupt"
            )
    for key in ("total_written", "rejected"):
        value = as_integer(state[key])
        if value is None or value < 0:
            raise StateError(f"pool state: {key!r} is {state[key]!r}, not an integer >= 0")
    if as_integer(state["total_written"]) < rows.shape[0]:
        raise StateError(
            f"pool state: total_written {state['total_written']} is below the "
            f"{rows.shape[0]} rows saved"
        )
    return rows, None if dim is None else as_integer(dim)
