"""The defense's step room: each optimiser step decided once, as a plan of plain tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from roclip_plugin.loss import PLAIN, DistInfo
from roclip_plugin.matching import TorchMatcher
from roclip_plugin.pool import CaptionPool
from roclip_plugin.step import StepContext, StepDecider, StepSettings


def _features(seed: int, rows: int = 6, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(rows, dim, generator=g), dim=-1),
        F.normalize(torch.randn(rows, dim, generator=g), dim=-1),
    )


def _decider(**settings) -> StepDecider:
    pool = CaptionPool(32)
    pool.enqueue(_features(9, 12)[1])
    return StepDecider(pool, TorchMatcher(), DistInfo(), StepSettings(**settings))


def test_a_plain_step_plans_plain_and_enqueues_after_its_call():
    decider = _decider()
    img, txt = _features(1)
    plan = decider.plan(img, txt, StepContext(matching=False))
    assert plan is PLAIN and plan.plain and len(decider.pool) == 12
    decider.finish(img, txt)
    assert len(decider.pool) == 18 and decider.call_in_step == 0


def test_a_matching_step_plans_the_nearest_pool_captions():
    decider = _decider()
    img, txt = _features(2)
    rows = decider.pool.features()
    plan = decider.plan(img, txt, StepContext(matching=True))
    assert plan.matched is not None and plan.chosen is None and not plan.plain
    want = rows[(img @ rows.T).argmax(dim=1)]
    torch.testing.assert_close(plan.matched, want)


def test_an_accumulated_step_reuses_its_plan_and_refuses_another_batch_size():
    decider = _decider(accum_freq=2)
    img, txt = _features(3)
    first = decider.plan(img, txt, StepContext(matching=True))
    decider.finish(img, txt)
    assert decider.plan(img + 0.01, txt, StepContext(matching=False)) is first
    with pytest.raises(ValueError, match="every call of a step"):
        decider.plan(img[:4], txt[:4], StepContext(matching=True))
    assert decider.abandon() == 1 and decider.call_in_step == 0


def test_the_settings_refuse_bad_values_naming_the_flag():
    with pytest.raises(ValueError, match="--accum-freq"):
        StepSettings(accum_freq=0)
    with pytest.raises(ValueError, match="--roclip-duplicate-matches"):
        StepSettings(duplicate_matches="merge")
    with pytest.raises(ValueError, match=r"--roclip-risky-negatives\): invalid value 'kep'"):
        StepSettings(risky_negatives="kep")
