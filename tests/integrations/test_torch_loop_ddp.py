"""The loop helper under DDP: two gloo processes on the CPU, as torchrun would start them."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_torch_loop import make_run
from torch.nn.parallel import DistributedDataParallel

from roclip_plugin import RoClipConfig, get_plugin_manager, hookimpl

WORLD = 2
CONFIG = RoClipConfig.from_preset("paper", pool_size=96, first_defended_epoch=1, defend_every=1)


class PoolLog:
    """Pool checksum at every epoch start and after every update, as each rank sees it."""

    def __init__(self) -> None:
        self.checksums: list[float] = []

    @hookimpl
    def roclip_epoch_start(self, defense):
        self.checksums.append(defense.pool.checksum())

    @hookimpl
    def roclip_pool_updated(self, pool):
        self.checksums.append(pool.checksum())


def _run(folder: Path, stop_after: int | None = None, seed: int = 0) -> tuple:
    log = PoolLog()
    pm = get_plugin_manager()
    pm.register(log)
    trainer = make_run(folder, CONFIG, epochs=3, seed=seed, plugin_manager=pm, batch_size=16)
    history = trainer.fit(stop_after=stop_after)
    return trainer, history, log


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        # Each rank seeds its own RNG (different dropout masks); DDP broadcasts rank 0's weights.
        trainer, history, log = _run(Path(out) / "straight", seed=rank)
        _run(Path(out) / "split", stop_after=2, seed=rank)
        resumed, resumed_history, _ = _run(Path(out) / "split", seed=rank + 7)
        result = {
            "ddp": isinstance(trainer.model, DistributedDataParallel),
            "history": [h.to_dict() for h in history],
            "checksums": log.checksums,
            "pool": trainer.adapter.pool.features(),
            "params": trainer.module.state_dict(),
            "resumed_history": [h.to_dict() for h in resumed_history],
            "resumed_pool": resumed.adapter.pool.features(),
            "resumed_params": resumed.module.state_dict(),
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _nan_free(history: list[dict]) -> list[dict]:
    return [{k: "nan" if v != v else v for k, v in h.items()} for h in history]


def test_two_ranks_share_one_pool_and_resume_exactly(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))

    assert r0["ddp"] and r1["ddp"]
    # The same pool on both ranks after every update, filled from both ranks' captions.
    assert r0["checksums"] == r1["checksums"] and len(r0["checksums"]) == 3 + 3 * 8
    assert torch.equal(r0["pool"], r1["pool"]) and r0["pool"].shape[0] == 96
    # DDP kept the replicas equal: gradients went through the wrapper's forward.
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])

    history = r0["history"]
    assert _nan_free(history) == _nan_free(r1["history"])  # reduced over ranks
    assert all(math.isfinite(h["loss"]) for h in history)
    assert [h["matching"] for h in history] == [False, True, True]
    assert [h["matching_steps"] for h in history] == [0, 8, 8]
    assert all(h["steps"] == 8 for h in history)  # 256 samples / 2 ranks / 16 per batch

    # Rank 0 wrote one checkpoint per epoch, holding both ranks' RNG states and the pool.
    checkpoint = torch.load(tmp_path / "straight" / "epoch_3.pt", weights_only=False)
    assert len(checkpoint["rng"]) == WORLD
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    assert torch.equal(checkpoint["roclip"]["pool"]["features"], r0["pool"])

    # Stopped after 2 epochs and resumed (from another initialisation): the same run.
    for rank in (r0, r1):
        assert _nan_free(rank["resumed_history"]) == _nan_free(history)
        assert torch.equal(rank["resumed_pool"], r0["pool"])
        assert all(torch.equal(rank["resumed_params"][k], r0["params"][k]) for k in r0["params"])
