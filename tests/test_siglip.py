"""RoCLIP's sigmoid (SigLIP) loss on one process: plain and matching steps, duplicates.

The comparison with OpenCLIP's own ``SigLipLoss`` (every distributed implementation) is in
tests/integrations/openclip/test_siglip.py; here the reference is the formula written out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from step_harness import StepHarness

from roclip_plugin import RoClipConfig, RoClipDefense
from roclip_plugin.hookspecs import hookimpl
from roclip_plugin.loss import DistInfo
from roclip_plugin.matching import TorchMatcher
from roclip_plugin.pool import CaptionPool
from roclip_plugin.siglip import RoClipSigLipLoss, check_dist_impl, sigmoid_loss

SCALE = torch.tensor(10.0)
BIAS = torch.tensor(-5.0)


def _features(seed: int, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return img, txt


def _reference(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    excluded: list[tuple[int, int]] = (),
) -> torch.Tensor:
    """SigLIP's loss: -sum log sigmoid(label * logit) / batch, minus the excluded pairs."""
    logits = scale * img @ txt.T + (0.0 if bias is None else bias)
    labels = 2 * torch.eye(len(img)) - 1
    terms = F.logsigmoid(labels * logits)
    for row, col in excluded:
        terms = terms.index_put((torch.tensor([row]), torch.tensor([col])), torch.tensor(0.0))
    return -terms.sum() / len(img)


def _fixed_matcher(indices: list[int]):
    def matcher(image_features: torch.Tensor, pool: CaptionPool) -> torch.Tensor:
        return torch.tensor(indices)

    return matcher


def _loss(pool: CaptionPool, matcher=None, **kw) -> RoClipSigLipLoss:
    return StepHarness(
        pool, matcher or TorchMatcher(), DistInfo(), loss_class=RoClipSigLipLoss, **kw
    )


@pytest.mark.parametrize("bias", [BIAS, None], ids=["bias", "no-bias"])
def test_plain_step_is_the_sigmoid_loss(bias) -> None:
    img, txt = _features(0, 7, 12)
    got = _loss(CaptionPool(16))(img, txt, SCALE, bias, output_dict=True)
    assert list(got) == ["contrastive_loss"]
    torch.testing.assert_close(got["contrastive_loss"], _reference(img, txt, SCALE, bias))


def test_matching_step_trains_each_image_against_its_matched_pool_caption() -> None:
    img, _ = _features(1, 6, 8)
    pool_rows = F.normalize(torch.randn(20, 8), dim=-1)
    pool = CaptionPool(32)
    pool.enqueue(pool_rows)
    img = img.clone().requires_grad_()
    txt = _features(2, 6, 8)[1].requires_grad_()
    scale, bias = SCALE.clone().requires_grad_(), BIAS.clone().requires_grad_()
    indices = TorchMatcher()(img.detach(), pool)
    assert len(set(indices.tolist())) == len(indices)  # no duplicates: mask changes nothing
    loss = _loss(pool, update_pool_when_plain=False)
    loss.matching = True
    got = loss(img, txt, scale, bias)
    torch.testing.assert_close(got, _reference(img, pool.gather(indices), scale, bias))
    got.backward()
    assert img.grad.abs().sum() > 0 and scale.grad != 0 and bias.grad != 0
    assert txt.grad is not None and torch.count_nonzero(txt.grad) == 0  # in graph, zero grad
    assert len(pool) == 26  # the batch's own captions enter after the lookup


def _duplicated(duplicate_matches: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images 0 and 1 matched to the same pool caption; returns (loss, images, matched)."""
    img, txt = _features(3, 4, 8)
    pool = CaptionPool(8)
    pool.enqueue(F.normalize(torch.randn(3, 8), dim=-1))
    indices = [0, 0, 1, 2]
    matched = pool.gather(torch.tensor(indices))
    loss = _loss(pool, _fixed_matcher(indices), duplicate_matches=duplicate_matches)
    loss.matching = True
    return loss(img, txt, SCALE, BIAS), img, matched


def test_keep_labels_a_shared_caption_positive_and_negative_as_the_authors_loss() -> None:
    got, img, matched = _duplicated("keep")
    torch.testing.assert_close(got, _reference(img, matched, SCALE, BIAS))


def test_mask_makes_a_shared_caption_a_positive_of_each_image_and_a_negative_of_none() -> None:
    got, img, matched = _duplicated("mask")
    want = _reference(img, matched, SCALE, BIAS, excluded=[(0, 1), (1, 0)])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, _reference(img, matched, SCALE, BIAS))


def test_plain_steps_report_the_in_batch_retrieval_accuracy() -> None:
    img, txt = _features(4, 8, 8)
    txt[:3] = img[:3]  # three images retrieve their own caption for certain
    seen: list[torch.Tensor] = []
    _loss(CaptionPool(16), on_alignment=seen.append)(img, txt, SCALE, BIAS)
    logits = img @ txt.T
    want = (logits.argmax(dim=1) == torch.arange(8)).float().mean()
    assert len(seen) == 1 and seen[0].ndim == 0
    torch.testing.assert_close(seen[0], want)
    assert float(seen[0]) >= 3 / 8


def test_sigmoid_loss_returns_the_accuracy_the_bias_does_not_change() -> None:
    img, txt = _features(5, 6, 8)
    _, with_bias = sigmoid_loss(img, txt, SCALE, BIAS, DistInfo())
    _, without = sigmoid_loss(img, txt, SCALE, None, DistInfo())
    assert torch.equal(with_bias, without)


def test_an_unknown_dist_impl_is_refused() -> None:
    assert check_dist_impl(None) == "bidir"
    with pytest.raises(ValueError, match="--loss-dist-impl.*allowed: bidir, shift"):
        RoClipSigLipLoss(DistInfo(dist_impl="ring"))


def test_the_defense_trains_the_sigmoid_loss_when_asked() -> None:
    defense = RoClipDefense(
        RoClipConfig.from_preset("paper", pool_size=16), siglip=True, dist_info=DistInfo()
    )
    assert isinstance(defense.criterion, RoClipSigLipLoss)
    img, txt = _features(6, 4, 8)
    defense.start_epoch(0)
    got = defense.compute_loss(img, txt, SCALE, BIAS)
    torch.testing.assert_close(got, _reference(img, txt, SCALE, BIAS))


def test_the_default_preset_drops_the_risky_rows_from_the_sigmoid_loss() -> None:
    """``robust`` (drop) with --siglip: the defended step is the sigmoid loss over the kept
    rows, on one process (it used to fail at the first defended step)."""
    config = RoClipConfig.from_preset("robust", pool_size=64, match_fraction=0.25)
    defense = RoClipDefense(config, siglip=True, dist_info=DistInfo())
    plans = []
    defense.pm.register(_PlanSpy(plans))
    img, txt = _features(7, 8, 8)
    ids = torch.arange(8)
    for epoch in range(3):
        defense.start_epoch(epoch)
        got = defense.compute_loss(img, txt, SCALE, BIAS, sample_ids=ids)
    risky = plans[-1]
    assert defense.matching and int(risky.sum()) == 2
    keep = ~risky
    torch.testing.assert_close(got, _reference(img[keep], txt[keep], SCALE, BIAS))


class _PlanSpy:
    """Records which rows the risk split judged risky at each judged step."""

    def __init__(self, out: list[torch.Tensor]) -> None:
        self.out = out

    @hookimpl
    def roclip_after_risk(self, stats) -> None:
        self.out.append(stats.risky.clone())


@pytest.mark.parametrize("action", ["weight", "unimodal"])
def test_actions_that_weigh_pairs_are_refused_before_training(action) -> None:
    config = RoClipConfig.from_preset("robust", match_action=action)
    with pytest.raises(ValueError, match=f"match_action .*{action} needs per-pair weights"):
        RoClipDefense(config, siglip=True, dist_info=DistInfo())


def test_a_drop_across_ranks_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match="drop with the SigLIP loss .* on 2 processes"):
        RoClipDefense(RoClipConfig(), siglip=True, dist_info=DistInfo(rank=0, world_size=2))
