"""Distribution facts, small collectives and RNG capture that every integration needs.

Where this process stands (rank, world size: from the process group, or from the launcher's
environment where no group can be asked) is read here and nowhere else; each collective is a
no-op wrapper on a single process, so callers need no special case.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """Rank and world size of the initialised process group; ``(0, 1)`` without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_rank() -> int:
    """The rank of this process in the initialised process group; 0 without one."""
    return rank_and_world_size()[0]


def launch_rank() -> int:
    """The rank the launcher gave this process (torchrun's ``RANK``; 0 when unset or empty).

    For code that may run where no process group is initialised though the run is distributed:
    a DataLoader worker is a separate process, yet inherits the environment.
    """
    return int(os.environ.get("RANK", "0") or 0)


def launch_world_size() -> int:
    """Processes of a torchrun launch (``WORLD_SIZE``); 1 when unset or unreadable.

    Read before OpenCLIP initialises the process group, to check flags against it.
    """
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def _collective_device() -> torch.device:
    """Where small tensors of a collective live: CUDA for NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks; returned on the CPU (NCCL needs it on a CUDA device)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return values.cpu()
    buf = values.to(_collective_device())
    dist.all_reduce(buf)
    return buf.cpu()


def all_gather_ints(value: int) -> list[int]:
    """Every rank's ``value`` in rank order (``[value]`` on a single process).

    One tiny collective (a host synchronisation under NCCL): cheap enough once per step.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return [int(value)]
    mine = torch.tensor([int(value)], dtype=torch.long, device=_collective_device())
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [int(t) for t in torch.cat(parts).cpu()]


def all_gather_rows(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's rows of ``values``, concatenated in rank order (``values`` on one process).

    Detached: for small per-row tensors (ids, scores, embeddings a bank keeps) that every rank
    must hold alike; the loss's differentiable gathers are ``loss.gather_features``.
    """
    if world_size == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(parts, values.detach().contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` on a single process)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def rng_state() -> dict[str, Any]:
    """RNG states of this process: torch (CPU and every CUDA device), Python, NumPy if present.

    Shuffling, random augmentations and DataLoader worker seeds draw from these; restoring them
    is what makes a resumed run continue bit for bit.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional for torch
        return state
    state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (entries this machine cannot use are skipped)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
