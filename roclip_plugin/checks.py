"""Checks of a run's settings against its length: the defense must never be silently off.

Two settings look valid on their own and still leave RoCLIP doing nothing useful:

- a schedule whose first defended epoch (or step block) lies beyond the end of the run: the run
  then trains with augmentation only (the paper preset's first defended epoch is 5, so any run
  of 5 epochs or fewer);
- a caption pool that holds a large share of an epoch's training pairs: a sample's own caption
  from its previous appearance is then still in the pool when its image is matched, and it is
  the nearest caption of a memorised pair, which hands a poisoned image its own poisoned
  caption. With a pool of P captions and N pairs an epoch, a sample's previous caption is in
  the pool for about P^2 / (2 N^2) of the samples when P <= N, and for all of them once
  P >= 2 N. The paper's pool was about 2% of its training set (21,845 of 1M pairs).

A third is an error: a pool whose float32 buffer (``pool_size x dim x 4`` bytes) is larger than
the memory it would live in (:func:`check_pool_fits`, called by the integrations once they
know the embedding width and the device).

The first two are warnings, not errors: an augmentation-only run is a legitimate baseline, and
a large pool on a small data set may be what an experiment wants. The messages name the flag
to change.
"""

from __future__ import annotations

import os

from roclip_plugin.config import RoClipConfig

POOL_SHARE_LIMIT = 0.10
PAPER_POOL_SHARE = "about 2% (21,845 captions for 1M pairs)"


def earliest_matching_unit(config: RoClipConfig, total_units: int) -> int:
    """The first unit the built-in schedule could match in a run of ``total_units`` units.

    For ``adaptive`` the start is data dependent; the earliest is the unit after unit 0 (the
    first unit whose accuracy can be measured), and never before ``first_defended_epoch``.
    """
    first = config.resolved_first_epoch(total_units)
    return max(first, 1) if config.schedule == "adaptive" else first


def no_matching_message(
    config: RoClipConfig, total_units: int | None, steps_per_epoch: int | None = None
) -> str | None:
    """Why no unit of the run can match, with the flag to change; None when one can."""
    if total_units is None:
        return None
    earliest = earliest_matching_unit(config, total_units)
    if earliest < total_units:
        return None
    if config.period_steps:
        where = (
            f"the first defended block of --roclip-period-steps {config.period_steps} steps "
            f"would be block {earliest}, but the run has {total_units} blocks"
        )
        if steps_per_epoch is not None:
            where += f" ({steps_per_epoch} steps an epoch)"
    else:
        where = (
            f"the first defended epoch would be epoch {earliest} (0-based), but the run has "
            f"{total_units} epochs"
        )
    return (
        f"RoCLIP never defends in this run: {where}, so it trains with augmentation only. "
        f"{_fix(config, total_units)}"
    )


def _fix(config: RoClipConfig, total_units: int) -> str:
    last = total_units - 1
    if config.schedule == "adaptive":
        return (
            "The adaptive schedule measures a plain unit before it can start: train for more "
            "units, or use --roclip-schedule periodic."
        )
    if config.warmup_fraction is not None:
        return "Lower --roclip-warmup-fraction."
    if config.first_defended_epoch is None:
        return (
            f"Lower --roclip-defend-every (the authors' numbering defends first at K-1), or "
            f"set --roclip-first-defended-epoch to at most {last}."
        )
    fix = f"Lower --roclip-first-defended-epoch to at most {last}"
    if config.period_steps:
        fix += " (it counts blocks), or lower --roclip-period-steps"
    if config.schedule == "ramp":
        fix += " (the ramp schedule starts there too)"
    return fix + ", or train longer."


def pool_share_message(config: RoClipConfig, samples_per_epoch: int | None) -> str | None:
    """A warning when the pool holds more than :data:`POOL_SHARE_LIMIT` of an epoch's pairs.

    Only where images meet pool captions: re-matching, or the margin risk score. A history or
    cosine score that drops or down-weights pairs never hands an image a pool caption.
    """
    reads_pool = config.match_action == "match" or config.risk_score == "margin"
    if not reads_pool:
        return None
    if not samples_per_epoch or config.pool_size <= POOL_SHARE_LIMIT * samples_per_epoch:
        return None
    share = config.pool_size / samples_per_epoch
    limit = int(POOL_SHARE_LIMIT * samples_per_epoch)
    return (
        f"RoCLIP: the caption pool (--roclip-pool-size {config.pool_size}) holds {share:.0%} of "
        f"an epoch's {samples_per_epoch} training pairs: for about "
        f"{own_caption_share(share):.0%} of the samples their own caption from the previous "
        "epoch is still in the pool when they are matched, and images get matched to it (a "
        f"poisoned image to its own poisoned caption). The paper's pool was {PAPER_POOL_SHARE}; "
        f"lower --roclip-pool-size to at most {limit} ({POOL_SHARE_LIMIT:.0%} of an epoch)."
    )


def own_caption_share(pool_share: float) -> float:
    """Share of samples whose previous-epoch caption is still in a pool of ``pool_share`` N.

    Between a sample's appearances in two shuffled epochs, N - u1 + u2 captions are enqueued
    (u1, u2 uniform in [0, N]): a triangular distribution on [0, 2N], below P with probability
    P^2 / (2 N^2) for P <= N and 1 - (2N - P)^2 / (2 N^2) up to P = 2N.
    """
    s = min(max(pool_share, 0.0), 2.0)
    return s * s / 2 if s <= 1 else 1 - (2 - s) ** 2 / 2


def pool_bytes(pool_size: int, dim: int) -> int:
    """Bytes of a caption pool's buffer: ``pool_size`` float32 rows of ``dim``."""
    return int(pool_size) * int(dim) * 4


def device_memory_bytes(device: str | None = None) -> int | None:
    """Total memory of ``device`` (a CUDA device's, else this machine's RAM); None if unknown.

    The pool lives on the device of the features it stores: the GPU for GPU training.
    """
    import torch

    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(target.index or 0).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): not checked
        return None


def check_pool_fits(pool_size: int, dim: int | None, available: int | None) -> None:
    """Refuse a ``--roclip-pool-size`` whose buffer is larger than the memory it would live in.

    Such a pool fails only when its first captions arrive (an allocation error after the model
    and data are built) or, on the CPU, drives the machine into swap. ``dim`` or ``available``
    None (unknown) skips the check.
    """
    if dim is None or available is None:
        return
    need = pool_bytes(pool_size, dim)
    if need > available:
        most = max(available // (4 * dim), 1)
        raise ValueError(
            f"--roclip-pool-size {pool_size}: its caption pool would take {_gib(need)} "
            f"({pool_size} x {dim} float32), more than the {_gib(available)} of memory it would "
            f"live in; lower --roclip-pool-size (at most {most} fits, and far fewer leaves "
            "room for training)"
        )


def _gib(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB"
