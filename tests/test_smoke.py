from __future__ import annotations

import torch

from roclip_plugin.smoke import DemoSettings, build_world, train

SMALL = DemoSettings(train=1200, test=300, targets=4, poison_captions=10, epochs=2)


def test_world_is_deterministic_and_poison_is_labelled() -> None:
    a, b = build_world(SMALL), build_world(SMALL)
    assert torch.equal(a.images, b.images) and torch.equal(a.captions, b.captions)
    assert int(a.poisoned.sum()) == SMALL.targets * SMALL.poison_captions
    assert a.images.shape[0] == SMALL.train + SMALL.targets * SMALL.poison_captions
    # every poisoned row shows a target image with a caption of its adversarial class
    assert torch.all(a.labels[a.poisoned] != a.target_labels.repeat_interleave(10))
    assert torch.equal(a.labels[a.poisoned], a.adversarial.repeat_interleave(10))
    other = build_world(DemoSettings(**{**SMALL.__dict__, "seed": 1}))
    assert not torch.equal(a.images, other.images)


def test_clip_training_learns_the_clean_task() -> None:
    world = build_world(SMALL)
    result = train(world, DemoSettings(**{**SMALL.__dict__, "epochs": 12}), None)
    assert result.zero_shot > 0.5  # chance is 0.1
    assert result.defended_epochs == [] and result.detection_precision is None


def test_smoke_trains_on_one_cpu_thread_and_restores_the_count(monkeypatch) -> None:
    """Two threads cost the tiny models 16x the CPU time (docs/smoke.md)."""
    import torch

    import roclip_plugin.smoke as smoke

    seen = []
    monkeypatch.setattr(smoke, "train", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    smoke.run_demo(smoke.DemoSettings(train=50, test=10, targets=1, poison_captions=2), None)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before


def test_the_old_module_name_warns_and_gives_the_same_objects() -> None:
    import importlib
    import sys

    import pytest

    import roclip_plugin.smoke as smoke

    sys.modules.pop("roclip_plugin.demo", None)
    with pytest.warns(DeprecationWarning, match="roclip_plugin.smoke"):
        old = importlib.import_module("roclip_plugin.demo")
    assert old.DemoSettings is smoke.DemoSettings and old.run_demo is smoke.run_demo
