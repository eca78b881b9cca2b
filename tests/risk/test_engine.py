"""The risk engine inside the loss: each action's mechanics, the warm-up, exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip import loss as open_clip_loss

from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager, hookimpl
from roclip_plugin.loss import DistInfo, RiskStats, contrastive_loss
from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk import nearest_neighbour_loss, unimodal_loss

ROWS, DIM = 8, 12
SCALE = torch.tensor(10.0)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    img = F.normalize(torch.randn(ROWS, DIM, generator=g), dim=-1)
    txt = F.normalize(img + 0.4 * torch.randn(ROWS, DIM, generator=g), dim=-1)
    ids = torch.randperm(32, generator=g)[:ROWS]
    return img, txt, ids


def _defense(**fields: object) -> RoClipDefense:
    config = RoClipConfig.from_preset("robust", pool_size=64, **fields)
    return RoClipDefense(config, dist_info=DistInfo(), samples_per_epoch=32)


class _Risks:
    def __init__(self) -> None:
        self.seen: list[RiskStats] = []

    @hookimpl
    def roclip_after_risk(self, stats: RiskStats) -> None:
        self.seen.append(stats)


def test_drop_equals_the_clip_loss_of_the_kept_pairs() -> None:
    """Dropping by mask (every rank keeps its batch size) is leaving the pairs out."""
    img, txt, _ = _batch(0)
    risky = torch.tensor([False, True, False, False, True, False, False, False])
    got, _ = contrastive_loss(img, txt, SCALE, DistInfo(), weights=(~risky).float(), excluded=risky)
    want = open_clip_loss.ClipLoss()(img[~risky], txt[~risky], SCALE)
    torch.testing.assert_close(got, want)


def test_weight_scales_each_pair_terms() -> None:
    img, txt, _ = _batch(1)
    weights = torch.linspace(0.1, 1.0, ROWS)
    got, _ = contrastive_loss(img, txt, SCALE, DistInfo(), weights=weights)
    logits = SCALE * img @ txt.T
    labels = torch.arange(ROWS)
    terms = F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(
        logits.T, labels, reduction="none"
    )
    torch.testing.assert_close(got, (weights * terms).sum() / (2 * weights.sum()))


def test_history_drop_leaves_the_worst_remembered_tenth_out_from_the_second_epoch() -> None:
    pm = get_plugin_manager(autoload=False)
    risks = _Risks()
    pm.register(risks)
    config = RoClipConfig.from_preset("robust", pool_size=64)
    defense = RoClipDefense(config, plugin_manager=pm, dist_info=DistInfo(), samples_per_epoch=32)
    defense.start_epoch(0)
    img, txt, ids = _batch(0)
    plain = defense.compute_loss(img, txt, SCALE, sample_ids=ids)
    torch.testing.assert_close(plain, open_clip_loss.ClipLoss()(img, txt, SCALE))
    assert not risks.seen and defense.risk is not None
    assert defense.risk.scorer.table.visited() == ROWS  # type: ignore[attr-defined]
    defense.start_epoch(1)
    img, txt, ids = _batch(1)
    loss = defense.compute_loss(img, txt, SCALE, sample_ids=ids)
    (stats,) = risks.seen
    assert int(stats.risky.sum()) == 1 and stats.action == "drop"
    keep = ~stats.risky
    torch.testing.assert_close(loss, open_clip_loss.ClipLoss()(img[keep], txt[keep], SCALE))
    assert int(stats.risk.argmax()) == int(torch.nonzero(stats.risky))


@pytest.mark.parametrize("negatives", ["out", "keep"])
def test_risky_pairs_stay_negatives_of_the_others_only_with_keep(negatives: str) -> None:
    """keep leaves out a risky pair's own link only: its caption and image still repel the rest.

    With out the pair is as if not in the batch: its caption gets no gradient at all. With keep
    its caption gets one (as a negative), and the loss is the safe rows' terms over every
    column of the batch.
    """
    pm = get_plugin_manager(autoload=False)
    risks = _Risks()
    pm.register(risks)
    config = RoClipConfig.from_preset("robust", pool_size=64, risky_negatives=negatives)
    defense = RoClipDefense(config, plugin_manager=pm, dist_info=DistInfo(), samples_per_epoch=32)
    defense.start_epoch(0)
    defense.compute_loss(*_batch(0)[:2], SCALE, sample_ids=_batch(0)[2])
    defense.start_epoch(1)
    img, txt, ids = _batch(1)
    txt = txt.clone().requires_grad_()
    loss = defense.compute_loss(img, txt, SCALE, sample_ids=ids)
    loss.backward()
    (stats,) = risks.seen
    risky = stats.risky
    assert int(risky.sum()) == 1
    if negatives == "out":
        torch.testing.assert_close(loss, open_clip_loss.ClipLoss()(img[~risky], txt[~risky], SCALE))
        assert float(txt.grad[risky].abs().sum()) == 0.0
        return
    logits = SCALE * img @ txt.detach().T
    labels = torch.arange(ROWS)
    terms = F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(
        logits.T, labels, reduction="none"
    )
    torch.testing.assert_close(loss.detach(), terms[~risky].mean() / 2)
    assert float(txt.grad[risky].abs().sum()) > 0.0


def test_risky_negatives_keep_is_refused_with_the_sigmoid_loss() -> None:
    config = RoClipConfig.from_preset("robust", risky_negatives="keep")
    with pytest.raises(ValueError, match=r"--roclip-risky-negatives\) keep") as info:
        RoClipDefense(config, dist_info=DistInfo(), siglip=True)
    assert "--roclip-risky-negatives out" in str(info.value)  # the way out


def test_the_history_score_without_ids_says_how_to_give_them() -> None:
    defense = _defense()
    defense.start_epoch(0)
    img, txt, _ = _batch(0)
    with pytest.raises(ValueError, match="sample_ids") as info:
        defense.compute_loss(img, txt, SCALE)
    assert "--roclip-risk-score margin" in str(info.value)  # and the way out without ids
    assert "--roclip-preset paper" in str(info.value)


def test_unimodal_warmup_links_nothing_across_modalities() -> None:
    defense = _defense(unimodal_warmup_epochs=1)
    defense.start_epoch(0)
    for step in range(3):
        img, txt, ids = _batch(step)
        img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
        scale = SCALE.clone().requires_grad_()
        loss = defense.compute_loss(img, txt, scale, sample_ids=ids)
        loss.backward()
        assert float(scale.grad) == 0.0  # no image-caption logit was computed
    # the image gradient does not depend on the captions: change them, same gradient
    img, txt, ids = _batch(3)
    grads = []
    for caption in (txt, txt.flip(0)):
        probe = img.clone().requires_grad_()
        defense_copy = _defense(unimodal_warmup_epochs=1)
        defense_copy.load_state_dict(defense.state_dict())
        defense_copy.compute_loss(probe, caption, SCALE, sample_ids=ids).backward()
        grads.append(probe.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert float(grads[0].abs().sum()) > 0


def test_unimodal_action_trains_risky_pairs_within_each_modality() -> None:
    defense = _defense(match_action="unimodal", image_bank_size=32)
    for epoch in range(2):
        defense.start_epoch(epoch)
        img, txt, ids = _batch(epoch)
        txt = txt.clone().requires_grad_()
        defense.compute_loss(img, txt, SCALE, sample_ids=ids).backward()
    assert defense.risk is not None and defense.risk.image_bank is not None
    assert len(defense.risk.image_bank) == 2 * ROWS
    assert txt.grad is not None and float(txt.grad.abs().sum()) > 0


def test_nearest_neighbour_term_pulls_towards_the_bank_neighbour() -> None:
    bank = CaptionPool(16)
    rows = F.normalize(torch.randn(16, DIM), dim=-1)
    bank.enqueue(rows)
    assert nearest_neighbour_loss(rows[:4], CaptionPool(4)) is None
    exact = nearest_neighbour_loss(rows[:4], bank)
    far = nearest_neighbour_loss(F.normalize(rows[:4] + 0.8 * torch.randn(4, DIM), dim=-1), bank)
    assert exact is not None and far is not None and float(exact) < float(far)
    zero = unimodal_loss(rows[:1].requires_grad_(), rows[:1].requires_grad_(), None, None)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def _run(defense: RoClipDefense, epochs: range, steps: int = 3) -> list[float]:
    losses = []
    for epoch in epochs:
        defense.start_epoch(epoch)
        for step in range(steps):
            img, txt, ids = _batch(10 * epoch + step)
            losses.append(float(defense.compute_loss(img, txt, SCALE, sample_ids=ids)))
    return losses


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"risk_split": "gmm", "match_fraction": 0.5, "gmm_window": 64},
        {"risk_score": "density", "density_k": 4, "image_bank_size": 16},
        {"match_action": "weight", "risk_weight": 0.2},
    ],
    ids=["history-drop", "gmm", "density", "weight"],
)
def test_resume_continues_exactly(tmp_path: object, fields: dict) -> None:
    """History, mixture window and image bank are in the state: a resumed run is the same."""
    straight = _run(_defense(**fields), range(4))
    first = _defense(**fields)
    head = _run(first, range(2))
    path = first.save(tmp_path / "state.pt")  # type: ignore[operator]
    resumed = _defense(**fields)
    resumed.load(path)
    assert head + _run(resumed, range(2, 4)) == straight


def test_a_share_that_reaches_the_whole_batch_never_empties_a_step() -> None:
    """drop 0.9 of a batch of 8 (ceil: 8 pairs) keeps one pair, where slicing left none."""
    config = RoClipConfig.from_preset(
        "paper", pool_size=16, match_action="drop", match_fraction=0.9, first_defended_epoch=0
    )
    defense = RoClipDefense(config, dist_info=DistInfo())
    defense.start_epoch(0)
    for step in range(2):  # the first step fills the pool, the second drops
        img, txt, _ = _batch(step)
        loss = defense.compute_loss(img, txt, SCALE)
        assert torch.isfinite(loss)
