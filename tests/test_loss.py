from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from step_harness import StepHarness

from roclip_plugin.loss import (
    DistInfo,
    RoClipLoss,
    contrastive_loss,
    retrieval_accuracy,
)
from roclip_plugin.matching import TorchMatcher
from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk import largest_margins

open_clip_loss = pytest.importorskip("open_clip.loss")


def _features(seed: int, batch: int, dim: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(dtype)
    return img, txt


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    batch=st.integers(1, 17),
    dim=st.integers(1, 24),
    scale=st.floats(1.0, 100.0),
)
def test_plain_loss_equals_openclip_clip_loss(seed, batch, dim, scale):
    img, txt = _features(seed, batch, dim)
    logit_scale = torch.tensor(scale)
    ours = StepHarness(CaptionPool(8), TorchMatcher(), DistInfo())
    want = open_clip_loss.ClipLoss()(img, txt, logit_scale, output_dict=True)
    got = ours(img, txt, logit_scale, output_dict=True)
    assert set(got) == set(want) == {"contrastive_loss"}
    torch.testing.assert_close(got["contrastive_loss"], want["contrastive_loss"])


def test_matching_loss_with_own_captions_equals_clip_loss():
    """When each image's match is its own caption, the matching loss is CLIP's loss."""
    img, txt = _features(3, 12, 16)
    pool = CaptionPool(64)
    pool.enqueue(txt)

    def own_caption(image_features, pool_):
        return torch.arange(image_features.shape[0])

    loss = StepHarness(pool, own_caption, DistInfo(), update_pool_when_plain=False)
    loss.matching = True
    scale = torch.tensor(14.0)
    got = loss(img, txt, scale)
    want = open_clip_loss.ClipLoss()(img, txt, scale)
    torch.testing.assert_close(got, want)


def test_output_dict_holds_only_the_loss():
    img, txt = _features(4, 8, 8)
    pool = CaptionPool(32)
    pool.enqueue(txt)
    loss = StepHarness(pool, TorchMatcher(), DistInfo(), on_match=lambda stats: None)
    loss.matching = True
    out = loss(img, txt, torch.tensor(10.0), output_dict=True)
    assert list(out) == ["contrastive_loss"]


class TwoTower(torch.nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.image = torch.nn.Linear(dim, dim)
        self.text = torch.nn.Linear(dim, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y):
        return (
            F.normalize(self.image(x), dim=-1),
            F.normalize(self.text(y), dim=-1),
            self.logit_scale.exp(),
        )


def _grads(model: TwoTower, matching: bool) -> dict[str, torch.Tensor]:
    x, y = torch.randn(10, 8), torch.randn(10, 8)
    pool = CaptionPool(64)
    pool.enqueue(torch.randn(30, 8))
    loss_fn = StepHarness(pool, TorchMatcher(), DistInfo())
    loss_fn.matching = matching
    model.zero_grad()
    loss_fn(*model(x, y)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_matching_steps_train_only_the_image_tower_but_keep_text_in_graph():
    grads = _grads(TwoTower(), matching=True)
    assert grads["image.weight"].abs().sum() > 0
    assert grads["logit_scale"].abs() > 0
    # The text tower is in the graph (a gradient exists, so DDP finds it) but receives zero.
    assert grads["text.weight"] is not None
    assert torch.count_nonzero(grads["text.weight"]) == 0


def test_plain_steps_train_both_towers():
    grads = _grads(TwoTower(), matching=False)
    assert grads["image.weight"].abs().sum() > 0
    assert grads["text.weight"].abs().sum() > 0


def test_lookup_happens_before_enqueue():
    """A batch's own captions are never candidates for its own images."""
    img, txt = _features(5, 6, 8)
    old = F.normalize(torch.randn(10, 8), dim=-1)
    pool = CaptionPool(100)
    pool.enqueue(old)
    seen: list[torch.Tensor] = []
    loss = StepHarness(
        pool, TorchMatcher(), DistInfo(), on_match=lambda stats: seen.append(stats.matched_indices)
    )
    loss.matching = True
    loss(img, img.clone(), torch.tensor(10.0))  # own captions identical to the images
    assert seen and int(seen[0].max()) < 10  # only the 10 older rows could be matched
    assert len(pool) == 16


def test_match_stats_margins():
    img, txt = _features(6, 5, 8)
    pool = CaptionPool(50)
    pool.enqueue(torch.randn(20, 8))
    got = []
    loss = StepHarness(pool, TorchMatcher(), DistInfo(), on_match=got.append)
    loss.matching = True
    loss(img, txt, torch.tensor(10.0))
    stats = got[0]
    matched = pool.gather(stats.matched_indices)  # pool grew after the lookup: oldest rows kept
    want_matched = (img * matched).sum(-1)
    want_own = (img * txt).sum(-1)
    torch.testing.assert_close(stats.margins, want_matched - want_own)
    assert stats.pool_fill == 20 and stats.pool_size == 50
    assert stats.matched_similarity == pytest.approx(float(want_matched.mean()), abs=1e-6)
    assert stats.own_similarity == pytest.approx(float(want_own.mean()), abs=1e-6)
    # the nearest caption is at least as similar as any other pool row
    assert torch.all(
        stats.margins >= (img @ pool.features()[:20].T).max(1).values - want_own - 1e-6
    )


def test_pool_update_policies():
    img, txt = _features(7, 4, 8)
    every = CaptionPool(16)
    StepHarness(every, TorchMatcher(), DistInfo())(img, txt, torch.tensor(1.0))
    assert len(every) == 4
    only_matching = CaptionPool(16)
    StepHarness(only_matching, TorchMatcher(), DistInfo(), update_pool_when_plain=False)(
        img, txt, torch.tensor(1.0)
    )
    assert len(only_matching) == 0


def test_matching_step_with_empty_pool_falls_back_to_clip_and_fills_pool():
    img, txt = _features(8, 4, 8)
    pool = CaptionPool(16)
    loss = StepHarness(pool, TorchMatcher(), DistInfo(), update_pool_when_plain=False)
    loss.matching = True
    got = loss(img, txt, torch.tensor(3.0))
    torch.testing.assert_close(got, open_clip_loss.ClipLoss()(img, txt, torch.tensor(3.0)))
    assert len(pool) == 4


def test_bf16_features_work_and_pool_stays_fp32():
    img, txt = _features(9, 6, 8, torch.bfloat16)
    pool = CaptionPool(16)
    pool.enqueue(torch.randn(8, 8))
    loss = StepHarness(pool, TorchMatcher(), DistInfo())
    loss.matching = True
    out = loss(img, txt, torch.tensor(5.0))
    assert torch.isfinite(out)
    assert pool.features().dtype == torch.float32


@pytest.mark.parametrize("matching", [False, True])
def test_a_logit_bias_is_added_as_clip_loss_adds_it(matching):
    """A SigLIP-architecture model without --siglip: the bias shifts every logit, no more."""
    img, txt = _features(10, 6, 8)
    bias = torch.tensor(-10.0, requires_grad=True)
    scale = torch.tensor(5.0)

    def loss_fn():
        pool = CaptionPool(16)
        pool.enqueue(_features(11, 6, 8)[1])
        loss = StepHarness(pool, TorchMatcher(), DistInfo())
        loss.matching = matching
        return loss

    got = loss_fn()(img, txt, scale, bias)
    torch.testing.assert_close(got, loss_fn()(img, txt, scale))
    if not matching:
        torch.testing.assert_close(got, open_clip_loss.ClipLoss()(img, txt, scale, bias))
    got.backward()
    assert bias.grad is not None and abs(float(bias.grad)) < 1e-6  # in the graph, no gradient


def test_retrieval_accuracy():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 9.0]])
    assert float(retrieval_accuracy(logits, DistInfo())) == pytest.approx(2 / 3)


def test_contrastive_loss_local_matches_openclip_single_process():
    img, txt = _features(11, 9, 12)
    scale = torch.tensor(7.0)
    got, _ = contrastive_loss(img, txt, scale, DistInfo(local_loss=True))
    torch.testing.assert_close(got, open_clip_loss.ClipLoss(local_loss=True)(img, txt, scale))


def test_largest_margins_picks_the_worst_fitting_own_captions():
    img = torch.eye(4)
    matched = torch.eye(4)  # every image's match fits it perfectly
    own = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0.6, 0.8, 0], [0, 0, 0, 1.0]])
    # margins 0, 1, 0.4, 0: the largest is image 1, then image 2
    assert largest_margins(img, own, matched, 0.25).tolist() == [False, True, False, False]
    assert largest_margins(img, own, matched, 0.5).tolist() == [False, True, True, False]
    assert largest_margins(img, own, matched, 1.0).all()


def test_partial_matching_repairs_the_chosen_images_and_keeps_the_rest_own_captions():
    img, txt = _features(5, 10, 16)
    g = torch.Generator().manual_seed(6)
    pool = CaptionPool(64)
    pool.enqueue(F.normalize(torch.randn(30, 16, generator=g), dim=-1))
    matcher = TorchMatcher()
    loss = StepHarness(pool, matcher, DistInfo(), update_pool_when_plain=False, match_fraction=0.3)
    loss.matching = True
    scale = torch.tensor(10.0)
    txt = txt.clone().requires_grad_(True)
    matched = pool.gather(matcher(img, pool))
    chosen = largest_margins(img, txt.detach(), matched, 0.3)
    assert int(chosen.sum()) == 3
    got = loss(img, txt, scale)
    targets = torch.where(chosen.unsqueeze(1), matched, txt.detach())
    torch.testing.assert_close(got, open_clip_loss.ClipLoss()(img, targets, scale))
    got.backward()
    # the own captions that stayed get a gradient, those replaced by pool captions none
    assert torch.all(txt.grad[chosen] == 0)
    assert torch.all(txt.grad[~chosen].abs().sum(1) > 0)


def test_drop_leaves_the_chosen_pairs_out_of_the_loss():
    img, txt = _features(7, 12, 16)
    g = torch.Generator().manual_seed(8)
    pool = CaptionPool(64)
    pool.enqueue(F.normalize(torch.randn(40, 16, generator=g), dim=-1))
    matcher = TorchMatcher()
    loss = StepHarness(
        pool, matcher, DistInfo(), update_pool_when_plain=False, match_fraction=0.25,
        match_action="drop",
    )  # fmt: skip
    loss.matching = True
    scale = torch.tensor(12.0)
    chosen = largest_margins(img, txt, pool.gather(matcher(img, pool)), 0.25)
    assert int(chosen.sum()) == 3
    keep = ~chosen
    want = open_clip_loss.ClipLoss()(img[keep], txt[keep], scale)
    torch.testing.assert_close(loss(img, txt, scale), want)


# -- matching precision under autocast, non-finite images --------------------------------------


def _clustered_problem(seed: int = 0, rows: int = 2048, batch: int = 64, dim: int = 64):
    """Images and a pool of near-duplicate rows: bfloat16 products cannot tell them apart."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(4, dim, generator=g), dim=-1)
    pool = centres[torch.randint(0, 4, (rows,), generator=g)]
    pool = F.normalize(pool + 0.003 * torch.randn(rows, dim, generator=g), dim=-1)
    img = centres[torch.randint(0, 4, (batch,), generator=g)]
    img = F.normalize(img + 0.003 * torch.randn(batch, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return img, txt, pool


def _plain_argmax_matcher(image_features, pool):
    """A plugin-style matcher that knows nothing about precision: one product, argmax."""
    return (image_features.float() @ pool.features().T).argmax(dim=1)


@pytest.mark.parametrize(
    "matcher",
    [TorchMatcher("fp32"), TorchMatcher("bf16"), _plain_argmax_matcher],
    ids=["torch-fp32", "torch-bf16", "plugin"],
)
def test_matching_under_autocast_searches_as_without_it(matcher):
    """OpenCLIP computes the loss under autocast: the search must not run in bf16 there."""
    img, txt, rows = _clustered_problem()

    def run(autocast: bool):
        pool = CaptionPool(4096)
        pool.enqueue(rows)
        seen = []
        loss = StepHarness(pool, matcher, DistInfo(), on_match=seen.append)
        loss.matching = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss(img, txt, torch.tensor(10.0))
        return seen[0]

    want, got = run(autocast=False), run(autocast=True)
    assert torch.equal(got.matched_indices, want.matched_indices)
    assert torch.equal(got.margins, want.margins)
    assert got.matched_similarity == want.matched_similarity


@pytest.mark.parametrize("matcher_name", ["torch", "faiss"])
def test_non_finite_image_features_are_refused_in_matching_steps(matcher_name):
    from roclip_plugin.config import RoClipConfig
    from roclip_plugin.matching import make_matcher

    img, txt = _features(12, 6, 8)
    img[2, 3] = float("nan")
    img[4, 0] = float("inf")
    pool = CaptionPool(32)
    pool.enqueue(torch.randn(10, 8))
    loss = StepHarness(pool, make_matcher(RoClipConfig(matcher=matcher_name)), DistInfo())
    loss.matching = True
    with pytest.raises(ValueError, match=r"2 of 6 image feature rows are non-finite"):
        loss(img, txt, torch.tensor(10.0))
    assert len(pool) == 10  # nothing was enqueued by the refused step


# -- duplicate matched captions ----------------------------------------------------------------


def _duplicated_softmax(duplicate_matches: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images 0 and 1 matched to the same pool caption; returns (loss, images, matched)."""
    img, txt = _features(9, 4, 8)
    pool = CaptionPool(8)
    pool.enqueue(F.normalize(torch.randn(3, 8), dim=-1))
    indices = torch.tensor([0, 0, 1, 2])
    loss = StepHarness(
        pool, lambda image_features, pool_: indices, DistInfo(),
        duplicate_matches=duplicate_matches,
    )  # fmt: skip
    loss.matching = True
    return loss(img, txt, torch.tensor(10.0)), img, pool.gather(indices)


def test_keep_duplicates_is_the_authors_loss_over_the_matched_captions():
    got, img, matched = _duplicated_softmax("keep")
    torch.testing.assert_close(got, open_clip_loss.ClipLoss()(img, matched, torch.tensor(10.0)))


def test_mask_leaves_a_shared_caption_out_of_the_other_images_softmax():
    got, img, matched = _duplicated_softmax("mask")
    logits = 10.0 * img @ matched.T
    shared = torch.zeros(4, 4, dtype=torch.bool)
    shared[0, 1] = shared[1, 0] = True
    logits = logits.masked_fill(shared, float("-inf"))
    labels = torch.arange(4)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, open_clip_loss.ClipLoss()(img, matched, torch.tensor(10.0)))


def test_an_unknown_duplicate_policy_is_refused():
    with pytest.raises(ValueError, match="duplicate_matches.*allowed: mask, keep"):
        StepHarness(CaptionPool(4), TorchMatcher(), DistInfo(), duplicate_matches="merge")


# -- gradient accumulation (OpenCLIP's --accum-freq) -------------------------------------------

ACCUM = 3
MICRO = 4


def _loss_class(name: str):
    """A step harness of the named loss kind, built like the old self-deciding loss."""
    from roclip_plugin.siglip import RoClipSigLipLoss

    loss_class = {"clip": RoClipLoss, "siglip": RoClipSigLipLoss}[name]
    return lambda *args, **kw: StepHarness(*args, loss_class=loss_class, **kw)


class CountingMatcher:
    """TorchMatcher that counts its lookups."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image_features, pool):
        self.calls += 1
        return TorchMatcher()(image_features, pool)


def _accumulated_problem():
    img, txt = _features(11, ACCUM * MICRO, 8)
    pool = CaptionPool(64)
    pool.enqueue(
        F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(12)), dim=-1)
    )
    return img, txt, pool


def _accumulate(loss_fn, img, txt, scale, jitter: float = 0.0):
    """OpenCLIP's accumulation: ACCUM calls on the whole batch, micro-batch j with gradient.

    ``jitter`` perturbs the "cached" rows a little on every call, as recomputed features may
    differ from the cached ones in the last bits. Returns (losses, image grad, pool sizes).
    """
    losses, grad, sizes = [], torch.zeros_like(img), []
    for j in range(ACCUM):
        noise = jitter * torch.randn_like(img)
        fresh = img.clone().requires_grad_()
        rows = slice(j * MICRO, (j + 1) * MICRO)
        call_img = torch.cat([(img + noise)[: rows.start], fresh[rows], (img + noise)[rows.stop :]])
        loss = loss_fn(call_img, txt, scale)
        loss.backward()
        grad[rows] = fresh.grad[rows]
        losses.append(loss.detach())
        sizes.append(len(loss_fn.pool))
    return losses, grad, sizes


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("matching", [True, False], ids=["matching", "plain"])
def test_an_accumulated_step_is_one_large_batch(kind, matching):
    """Same loss on every call, summed gradients of the large batch, one enqueue at the end."""
    img, txt, pool = _accumulated_problem()
    scale = torch.tensor(10.0)
    accumulated = _loss_class(kind)(pool, TorchMatcher(), DistInfo(), accum_freq=ACCUM)
    accumulated.matching = matching
    losses, grad, sizes = _accumulate(accumulated, img, txt, scale)
    assert sizes == [20, 20, 32]  # the captions enter the pool once, after the last call
    assert accumulated.call_in_step == 0

    _, _, reference_pool = _accumulated_problem()
    single = _loss_class(kind)(reference_pool, TorchMatcher(), DistInfo())
    single.matching = matching
    big = img.clone().requires_grad_()
    want = single(big, txt, scale)
    want.backward()
    for loss in losses:
        torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, big.grad)
    assert torch.equal(pool.features(), reference_pool.features())


def test_every_call_of_a_step_trains_against_the_first_calls_lookup():
    img, txt, pool = _accumulated_problem()
    matcher = CountingMatcher()
    seen = []
    loss_fn = StepHarness(pool, matcher, DistInfo(), accum_freq=ACCUM, on_match=seen.append)
    loss_fn.matching = True
    losses, _, _ = _accumulate(loss_fn, img, txt, torch.tensor(10.0), jitter=1e-3)
    assert matcher.calls == 1 and len(seen) == 1  # one lookup, one statistics record
    steps = []
    loss_fn.on_step = lambda: steps.append(loss_fn.call_in_step)
    _accumulate(loss_fn, img, txt, torch.tensor(10.0))
    assert steps == [0] and matcher.calls == 2  # the next step counts and looks up once


def test_a_call_without_the_whole_accumulated_batch_is_refused():
    img, txt, pool = _accumulated_problem()
    loss_fn = StepHarness(pool, TorchMatcher(), DistInfo(), accum_freq=2)
    loss_fn(img, txt, torch.tensor(10.0))
    with pytest.raises(ValueError, match="loss call 2 of 2 .* got 4 rows, its first call 12"):
        loss_fn(img[:MICRO], txt[:MICRO], torch.tensor(10.0))


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_accum_freq_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="accum_freq .*--accum-freq.*integer >= 1"):
        StepHarness(CaptionPool(4), TorchMatcher(), DistInfo(), accum_freq=value)


def test_the_loss_computes_from_tensors_alone():
    """No pool, matcher or defense: a hand-made plan gives the loss of its targets."""
    from roclip_plugin.loss import PLAIN, StepPlan

    img, txt = _features(21, 6, 8)
    matched = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    scale = torch.tensor(10.0)
    loss = RoClipLoss(DistInfo())
    assert not any(isinstance(v, CaptionPool) or callable(v) for v in vars(loss).values())
    plain = loss(img, txt, scale, plan=PLAIN)
    torch.testing.assert_close(plain, contrastive_loss(img, txt, scale, DistInfo())[0])
    got = loss(img, txt, scale, plan=StepPlan(matched=matched, all_matched=matched))
    torch.testing.assert_close(got, contrastive_loss(img, matched, scale, DistInfo())[0])
    chosen = torch.tensor([True, False, False, True, False, False])
    partial = StepPlan(matched=matched, chosen=chosen)
    targets = torch.where(chosen[:, None], matched, txt)
    want = contrastive_loss(img, targets, scale, DistInfo())[0]
    torch.testing.assert_close(loss(img, txt, scale, plan=partial), want)


def test_the_old_constructor_is_refused_naming_the_defense():
    with pytest.raises(TypeError, match="RoClipDefense"):
        RoClipLoss(CaptionPool(4), TorchMatcher(), DistInfo())
    with pytest.raises(TypeError, match="RoClipDefense"):
        RoClipLoss(DistInfo(), update_pool_when_plain=False)
