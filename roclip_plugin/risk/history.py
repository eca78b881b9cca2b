"""Per-sample memory of how well each pair fitted, kept across epochs in a few bytes a sample.

A poisoned pair the model has learned to fit stops looking poisoned within a few epochs: its
image and its (wrong) caption become close. What gives it away is that it fitted badly
*earlier*, while the clean pairs of its class already fitted well. :class:`HistoryTable`
keeps, per stable sample id, an exponential moving average of a per-visit score, so a pair is
judged on its whole record, not on the current step alone.

Memory is bounded: one float16 per slot (2 bytes), ``slot = id mod slots``. With as many slots
as samples and ids that are row indices (CSV rows, the tensor path), every sample has its own
slot; hashed ids (WebDataset keys) or fewer slots than samples share slots, which blends the
memories of the samples that collide. 400M pairs take 800 MB per rank at one slot each.

Under ``torch.distributed`` the table is updated with the ids and scores of the *global*
batch (gathered in rank order), so it is identical on every rank and every rank takes the
same decision for the same sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

HISTORY_DTYPE = torch.float16
BYTES_PER_SLOT = torch.tensor([], dtype=HISTORY_DTYPE).element_size()
_ID_BITS = 63


def stable_id(key: str | bytes | int) -> int:
    """A sample id that is the same in every process and every run.

    Integers (row indices) are kept as they are; strings (a WebDataset sample's ``__key__``)
    are hashed with BLAKE2b to 63 bits. Python's ``hash`` is salted per process, so it would
    give every rank and every resumed run other ids.
    """
    if isinstance(key, bool):
        raise TypeError(f"sample id: {key!r} is a bool; give a row index or a string key")
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"sample id: {key} is negative; row indices start at 0")
        return key
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _ID_BITS)


def stable_ids(keys: Any) -> torch.Tensor:
    """int64 tensor of :func:`stable_id` of each key (a tensor of ints passes through)."""
    if isinstance(keys, torch.Tensor):
        if keys.dtype.is_floating_point or keys.dtype == torch.bool:
            raise TypeError(f"sample ids: a {keys.dtype} tensor; give integer row indices")
        if keys.numel() and int(keys.min()) < 0:
            raise ValueError("sample ids: negative values; row indices start at 0")
        return keys.long().reshape(-1)
    return torch.tensor([stable_id(k) for k in keys], dtype=torch.long)


class HistoryTable:
    """EMA of a per-visit score per sample id; NaN marks a slot never visited.

    Args:
        slots: table size (one float16 each).
        decay: weight of the newest visit, in (0, 1]: 1 keeps only the latest visit.
    """

    def __init__(self, slots: int, decay: float) -> None:
        if slots < 1:
            raise ValueError(f"history slots: {slots} must be >= 1")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"history decay: {decay} must be in (0, 1]")
        self.slots = int(slots)
        self.decay = float(decay)
        self.values: torch.Tensor | None = None  # allocated on the first update's device

    def _table(self, device: torch.device) -> torch.Tensor:
        if self.values is None:
            self.values = torch.full(
                (self.slots,), float("nan"), dtype=HISTORY_DTYPE, device=device
            )
        elif self.values.device != device:
            self.values = self.values.to(device)
        return self.values

    @torch.no_grad()
    def update(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Blend ``scores`` into the memory of ``ids``; returns the updated memories (float32).

        A sample seen twice in one batch keeps its last occurrence's update (rank order, then
        batch order), the same on every rank.
        """
        table = self._table(scores.device)
        slot = ids.to(scores.device).long() % self.slots
        old = table[slot].float()
        fresh = torch.isnan(old)
        new = torch.where(fresh, scores.float(), (1 - self.decay) * old + self.decay * scores)
        table[slot] = new.to(HISTORY_DTYPE)
        return table[slot].float()

    def memory(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Current memories of ``ids`` (NaN where never visited), float32."""
        return self._table(device)[ids.to(device).long() % self.slots].float()

    def resize(self, slots: int) -> None:
        """Give the table ``slots`` slots while it holds no memory yet.

        For a trainer that learns its dataset's length after building the defense: ids are
        row indices, so the table must have a slot per row before the first visit. Once a
        memory is held, resizing would move every id to another slot, so it is refused.
        """
        if slots < 1:
            raise ValueError(f"history slots: {slots} must be >= 1")
        if self.visited():
            raise ValueError(
                f"the per-sample history holds {self.visited()} memories in {self.slots} "
                f"slots; it cannot be resized to {slots} after training has started"
            )
        self.slots = int(slots)
        self.values = None

    def visited(self) -> int:
        """Slots holding a memory."""
        return 0 if self.values is None else int((~torch.isnan(self.values)).sum())

    def state_dict(self) -> dict[str, Any]:
        """Slots, decay and the table (on the CPU)."""
        values = None if self.values is None else self.values.detach().cpu().clone()
        return {"slots": self.slots, "decay": self.decay, "values": values}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a table of another size is refused."""
        if int(state["slots"]) != self.slots:
            raise ValueError(
                f"RoCLIP state: the per-sample history has {state['slots']} slots, this run "
                f"{self.slots} (--roclip-history-slots): resume with the same value"
            )
        values = state["values"]
        device = self.values.device if self.values is not None else None
        self.values = None if values is None else values.to(HISTORY_DTYPE).to(device or "cpu")
