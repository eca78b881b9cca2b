"""Two CPU processes with gloo: identical pools on both ranks, the same loss as one process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from roclip_plugin import RoClipConfig, RoClipDefense
from roclip_plugin.loss import DistInfo
from roclip_plugin.siglip import RoClipSigLipLoss

WORLD = 2
BATCH = 8  # global batch; each rank takes BATCH // WORLD rows
DIM = 6
STEPS_PER_EPOCH = 3
EPOCHS = 3
CONFIG = RoClipConfig.from_preset(
    "paper", pool_size=20, defend_every=1, first_defended_epoch=1, schedule="periodic"
)


def _global_batch(epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * epoch + step)
    img = F.normalize(torch.randn(BATCH, DIM, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(BATCH, DIM, generator=g), dim=-1)
    return img, txt


def _step(
    defense: RoClipDefense, img: torch.Tensor, txt: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step: its loss and the gradient of this rank's image rows.

    With ``accum_freq`` N, as OpenCLIP accumulates: N calls on the whole batch, call j with
    gradient through micro-batch j only; the gradients of the micro-batches add up.
    """
    calls = defense.loss.accum_freq
    micro = img.shape[0] // calls
    grad = torch.zeros_like(img)
    for j in range(calls):
        rows = slice(j * micro, (j + 1) * micro)
        fresh = img.clone().requires_grad_()
        loss = defense.compute_loss(
            torch.cat([img[: rows.start], fresh[rows], img[rows.stop :]]),
            txt,
            torch.tensor(10.0),
            bias,
        )
        loss.backward()
        grad[rows] = fresh.grad[rows]
    return loss.detach(), grad


def _run(defense: RoClipDefense, rank: int, world: int) -> dict:
    """Drive the defense over a fixed run; returns losses, pool checksums and gradients.

    A SigLIP defense also gets a logit bias, as SigLIP models carry one.
    """
    bias = torch.tensor(-3.0) if isinstance(defense.criterion, RoClipSigLipLoss) else None
    losses, checksums, matching, grads = [], [], [], []
    per = BATCH // world
    for epoch in range(EPOCHS):
        matching.append(defense.start_epoch(epoch))
        for step in range(STEPS_PER_EPOCH):
            img, txt = _global_batch(epoch, step)
            local = slice(rank * per, (rank + 1) * per)
            loss, grad = _step(defense, img[local], txt[local], bias)
            grads.append(grad)
            losses.append(float(loss))
            checksums.append(defense.pool.checksum())
    return {
        "losses": losses,
        "checksums": checksums,
        "matching": matching,
        "pool": defense.pool.features(),
        "grads": grads,
        "alignment": dict(defense.schedule.alignment),
    }


def _worker(
    rank: int, store: str, out_dir: str, local_loss: bool, with_grad: bool, siglip: bool, accum: int
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        info = DistInfo.from_env(local_loss=local_loss, gather_with_grad=with_grad)
        defense = RoClipDefense(CONFIG, dist_info=info, siglip=siglip, accum_freq=accum)
        torch.save(_run(defense, rank, WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(
    tmp_path: Path, local_loss: bool, with_grad: bool, siglip: bool, accum: int
) -> list[dict]:
    mp.spawn(
        _worker,
        args=(str(tmp_path / "store"), str(tmp_path), local_loss, with_grad, siglip, accum),
        nprocs=WORLD,
        join=True,
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize(
    ("local_loss", "with_grad", "siglip", "accum"),
    [
        (False, False, False, 1),
        (True, True, False, 1),
        (False, True, False, 1),
        (False, False, True, 1),
        (False, False, False, 2),
        (False, False, True, 2),
    ],
    ids=[
        "clip",
        "clip-local-with-grad",
        "clip-with-grad",
        "siglip",
        "clip-accum-freq-2",
        "siglip-accum-freq-2",
    ],
)
def test_two_ranks_match_one_process(
    tmp_path: Path, local_loss: bool, with_grad: bool, siglip: bool, accum: int
) -> None:
    """Two ranks (accumulating too) against one process taking the whole batch at once."""
    ranks = _spawn(tmp_path, local_loss, with_grad, siglip, accum)
    single = _run(RoClipDefense(CONFIG, dist_info=DistInfo(), siglip=siglip), rank=0, world=1)

    # The same pool on every rank, after every step, and equal to the single-process pool.
    assert ranks[0]["checksums"] == ranks[1]["checksums"]
    assert torch.equal(ranks[0]["pool"], ranks[1]["pool"])
    torch.testing.assert_close(ranks[0]["pool"], single["pool"])
    assert ranks[0]["matching"] == ranks[1]["matching"] == single["matching"] == [False, True, True]
    assert ranks[0]["alignment"] == ranks[1]["alignment"]

    # The same loss as one process on the same global batch (matching steps included).
    r0, r1 = torch.tensor(ranks[0]["losses"]), torch.tensor(ranks[1]["losses"])
    want = torch.tensor(single["losses"])
    if siglip:
        # SigLIP: each rank sums its own images' terms over a local batch half the size, so
        # the mean of the ranks' losses is the one-process loss, and each rank's image rows
        # get WORLD times their slice of its gradient (duplicates masked across ranks too).
        torch.testing.assert_close((r0 + r1) / 2, want)
        for step, full in enumerate(single["grads"]):
            got = torch.cat([ranks[0]["grads"][step], ranks[1]["grads"][step]])
            torch.testing.assert_close(got, WORLD * full)
        return
    if local_loss:
        torch.testing.assert_close((r0 + r1) / 2, want)
    else:
        torch.testing.assert_close(r0, want)
        torch.testing.assert_close(r1, want)

    # Gradients w.r.t. each rank's image rows, OpenCLIP's semantics: without a differentiable
    # gather a rank's gradient is its slice of the full-batch gradient; with one, the backward
    # of all_gather sums every rank's (identical, full) loss, so it is WORLD times that slice.
    if not local_loss:
        factor = WORLD if with_grad else 1
        for step, full in enumerate(single["grads"]):
            got = torch.cat([ranks[0]["grads"][step], ranks[1]["grads"][step]])
            torch.testing.assert_close(got, factor * full)


def _unequal_worker(rank: int, store: str, out_dir: str) -> None:
    """Rank 0 brings 4 rows, rank 1 brings 3: every rank must get the same clear error."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        defense = RoClipDefense(CONFIG, dist_info=DistInfo.from_env())
        defense.start_epoch(0)
        img, txt = _global_batch(0, 0)
        rows = slice(0, 4) if rank == 0 else slice(4, 7)
        try:
            defense.compute_loss(img[rows], txt[rows], torch.tensor(10.0))
            message = "no error"
        except ValueError as err:
            message = str(err)
        Path(out_dir, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_unequal_batch_sizes_across_ranks_are_a_clear_error(tmp_path: Path) -> None:
    mp.spawn(_unequal_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "local batch sizes differ across ranks: [4, 3]" in message, message
        assert "drop_last=True" in message
