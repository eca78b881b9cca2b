"""The core's sigmoid loss against OpenCLIP's ``SigLipLoss``: values and gradients.

The core (``roclip_plugin``) never imports OpenCLIP, so it carries its own sigmoid loss; these
tests hold it to OpenCLIP's, on one process and on four gloo processes (four ranks exercise
both halves of ``bidir``: a pair of hops both ways, then the one-way remainder) for every
``--loss-dist-impl``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

open_clip_loss = pytest.importorskip("open_clip.loss")

from roclip_plugin.loss import DistInfo  # noqa: E402
from roclip_plugin.siglip import SIGLIP_DIST_IMPLS, sigmoid_loss  # noqa: E402

WORLD = 4
BATCH = 5
DIM = 8


def _inputs(rank: int, bias: bool) -> dict[str, torch.Tensor]:
    """This rank's leaf tensors (features, scale, bias), the same on every call."""
    generator = torch.Generator().manual_seed(100 + rank)
    image = F.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64), dim=-1)
    out = {
        "image_features": image.requires_grad_(),
        "text_features": text.requires_grad_(),
        "logit_scale": torch.tensor(10.0, dtype=torch.float64, requires_grad=True),
    }
    if bias:
        out["logit_bias"] = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    return out


def _loss_and_grads(fn, rank: int, bias: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = _inputs(rank, bias)
    loss = fn(inputs)
    loss.backward()
    return loss.detach(), {k: v.grad.clone() for k, v in inputs.items()}


def _both(rank: int, world: int, impl: str | None, bias: bool) -> tuple[tuple, tuple]:
    reference = open_clip_loss.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
    info = DistInfo(rank=rank, world_size=world, dist_impl=impl)

    def theirs(inputs):
        return reference(**inputs) if bias else reference(**inputs, logit_bias=None)

    def ours(inputs):
        return sigmoid_loss(
            inputs["image_features"],
            inputs["text_features"],
            inputs["logit_scale"],
            inputs.get("logit_bias"),
            info,
        )[0]

    return _loss_and_grads(theirs, rank, bias), _loss_and_grads(ours, rank, bias)


def _assert_same(theirs: tuple, ours: tuple) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = theirs, ours
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], msg=key)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_one_process_equals_siglip_loss(bias: bool) -> None:
    _assert_same(*_both(0, 1, None, bias))


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {
            (impl, bias): _both(rank, WORLD, impl, bias)
            for impl in SIGLIP_DIST_IMPLS
            for bias in (True, False)
        }
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_every_dist_impl_on_four_ranks_equals_siglip_loss(tmp_path: Path) -> None:
    """Each rank's loss and the gradients of its own leaves, for each --loss-dist-impl."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(results) == 2 * len(SIGLIP_DIST_IMPLS)
        for (impl, bias), (theirs, ours) in results.items():
            assert theirs[1]["text_features"].abs().sum() > 0, (impl, bias)  # grads came back
            _assert_same(theirs, ours)
