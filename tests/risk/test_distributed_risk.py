"""Two gloo ranks: the same risk decisions, history and loss as one process on the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager, hookimpl
from roclip_plugin.loss import DistInfo, RiskStats

WORLD, BATCH, DIM, STEPS, EPOCHS = 2, 8, 6, 3, 3
CASES = {
    "history-drop": {"match_fraction": 0.25},
    "gmm-unimodal": {
        "risk_score": "cosine",
        "risk_split": "gmm",
        "match_action": "unimodal",
        "match_fraction": 0.5,
        "gmm_window": 64,
        "image_bank_size": 32,
    },
    "history-weight": {"match_action": "weight", "match_fraction": 0.25},
}


def _config(case: str) -> RoClipConfig:
    return RoClipConfig.from_preset("robust", pool_size=16, **CASES[case])


def _global_batch(epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * epoch + step)
    img = F.normalize(torch.randn(BATCH, DIM, generator=g), dim=-1)
    txt = F.normalize(img + 0.6 * torch.randn(BATCH, DIM, generator=g), dim=-1)
    return img, txt, torch.randperm(24, generator=g)[:BATCH]


class _Decisions:
    def __init__(self) -> None:
        self.risky: list[torch.Tensor] = []

    @hookimpl
    def roclip_after_risk(self, stats: RiskStats) -> None:
        self.risky.append(stats.risky.clone())


def _run(case: str, rank: int, world: int, info: DistInfo) -> dict:
    pm = get_plugin_manager(autoload=False)
    decisions = _Decisions()
    pm.register(decisions)
    defense = RoClipDefense(_config(case), plugin_manager=pm, dist_info=info, samples_per_epoch=24)
    per = BATCH // world
    losses, grads = [], []
    for epoch in range(EPOCHS):
        defense.start_epoch(epoch)
        for step in range(STEPS):
            img, txt, ids = _global_batch(epoch, step)
            local = slice(rank * per, (rank + 1) * per)
            probe = img[local].clone().requires_grad_()
            loss = defense.compute_loss(
                probe, txt[local], torch.tensor(10.0), sample_ids=ids[local]
            )
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(probe.grad)
    assert defense.risk is not None
    return {
        "losses": losses,
        "grads": grads,
        "risky": decisions.risky,
        "state": defense.risk.state_dict(),
    }


def _worker(rank: int, store: str, out_dir: str, case: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.save(
            _run(case, rank, WORLD, DistInfo.from_env()), os.path.join(out_dir, f"r{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_decide_as_one_process(tmp_path: Path, case: str) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), case), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _run(case, 0, 1, DistInfo())
    assert single["risky"], "no defended step"
    # every rank holds the same memory (history table, mixture window, image bank), equal to
    # the one-process memory
    for got in ranks:
        torch.testing.assert_close(got["state"], single["state"], equal_nan=True)
    # the ranks' risky rows, side by side, are the one-process decision on the global batch
    for step, whole in enumerate(single["risky"]):
        assert torch.equal(torch.cat([r["risky"][step] for r in ranks]), whole)
    if case != "gmm-unimodal":  # the unimodal terms are per rank (local), by design
        for got in ranks:
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]))
        for step, full in enumerate(single["grads"]):
            torch.testing.assert_close(torch.cat([r["grads"][step] for r in ranks]), full)
