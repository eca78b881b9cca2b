"""Backdoor triggers: size and mode kept, deterministic, rebuilt from their dict, local."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from roclip_kit.attack.triggers import (
    BlendTrigger,
    PatchTrigger,
    WaNetTrigger,
    make_trigger,
    trigger_from_dict,
)


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(rgba)


positions = st.one_of(
    st.sampled_from(["random", "top-left", "top-right", "bottom-left", "bottom-right", "center"]),
    st.tuples(st.integers(0, 40), st.integers(0, 40)),
)
triggers = st.one_of(
    st.builds(
        PatchTrigger,
        size=st.one_of(st.integers(1, 20), st.floats(0.01, 1.0)),
        position=positions,
        seed=st.integers(0, 2**31),
    ),
    st.builds(BlendTrigger, alpha=st.floats(0.01, 1.0), seed=st.integers(0, 2**31)),
    st.builds(
        WaNetTrigger, k=st.integers(2, 8), strength=st.floats(0.1, 4.0), seed=st.integers(0, 2**31)
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    triggers,
    st.integers(4, 48),
    st.integers(4, 48),
    st.sampled_from(["RGB", "L", "RGBA"]),
    st.integers(0, 99),
)
def test_apply_keeps_size_and_mode_and_is_deterministic(trigger, width, height, mode, seed) -> None:
    image = _image(width, height, mode, seed)
    out = trigger.apply(image)
    assert out.size == image.size and out.mode == image.mode
    assert out.tobytes() == trigger.apply(image.copy()).tobytes()
    if mode == "RGBA":
        assert out.getchannel("A").tobytes() == image.getchannel("A").tobytes()


@settings(max_examples=60, deadline=None)
@given(triggers)
def test_dict_round_trip_through_json_rebuilds_the_same_trigger(trigger) -> None:
    rebuilt = trigger_from_dict(json.loads(json.dumps(trigger.to_dict())))
    assert rebuilt == trigger and rebuilt.kind == trigger.kind
    image = _image(24, 20)
    assert rebuilt.apply(image).tobytes() == trigger.apply(image).tobytes()


@pytest.mark.parametrize(
    ("position", "origin"),
    [("top-left", (0, 0)), ("bottom-right", (28, 20)), ("center", (14, 10)), ((5, 3), (5, 3))],
)
def test_patch_changes_only_its_square(position, origin) -> None:
    image = _image(32, 24)
    trigger = PatchTrigger(size=4, position=position, seed=1)
    before, after = np.asarray(image), np.asarray(trigger.apply(image))
    changed = np.any(before != after, axis=2)
    x, y = origin
    outside = changed.copy()
    outside[y : y + 4, x : x + 4] = False
    assert not outside.any()
    assert changed[y : y + 4, x : x + 4].mean() > 0.9  # noise differs almost everywhere


def test_patch_fraction_scales_and_keeps_its_noise_pattern() -> None:
    trigger = PatchTrigger(size=0.25, position="top-left", seed=2)
    large = np.asarray(trigger.apply(Image.new("RGB", (64, 64))))
    assert trigger.side(64, 64) == 16 and trigger.side(16, 16) == 4
    assert np.any(large[:16, :16] != 0) and not np.any(large[16:, :] != 0)
    # the 16-px patch is the 8x8 noise grid (an 8-px patch) with each cell doubled
    grid = np.asarray(
        PatchTrigger(size=8, position="top-left", seed=2).apply(Image.new("RGB", (8, 8)))
    )
    assert np.array_equal(large[:16:2, :16:2], grid)


def test_random_patch_place_follows_the_image_not_the_call_order() -> None:
    trigger = PatchTrigger(size=3, position="random", seed=0)
    images = [_image(32, 32, seed=s) for s in range(8)]
    origins = [trigger.origin(image, 3) for image in images]
    assert origins == [trigger.origin(image, 3) for image in reversed(images)][::-1]
    assert len(set(origins)) > 3
    assert trigger.origin(images[0], 3, key=7) == trigger.origin(images[1], 3, key=7)
    assert PatchTrigger(size=3, seed=1).origin(images[0], 3) != origins[0] or (
        PatchTrigger(size=3, seed=2).origin(images[0], 3) != origins[0]
    )


def test_blend_mixes_with_alpha() -> None:
    image = _image(20, 20)
    full = BlendTrigger(alpha=1.0, seed=3)
    assert full.apply(image).tobytes() == full.apply(_image(20, 20, seed=9)).tobytes()
    light = np.asarray(BlendTrigger(alpha=0.1, seed=3).apply(image), dtype=int)
    difference = np.abs(light - np.asarray(image, dtype=int))
    assert difference.max() <= 26 and difference.mean() > 2


def test_wanet_warps_smoothly_and_depends_on_the_seed() -> None:
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    image = Image.fromarray(np.stack([ramp, ramp.T, ramp], axis=2))
    warped = np.asarray(WaNetTrigger(strength=2.0, seed=0).apply(image), dtype=int)
    difference = np.abs(warped - np.asarray(image, dtype=int))
    assert difference.mean() > 1 and difference.max() < 64  # moved, but a warp, not noise
    other = np.asarray(WaNetTrigger(strength=2.0, seed=1).apply(image), dtype=int)
    assert not np.array_equal(warped, other)
    grid = WaNetTrigger().grid(32, 32)
    assert grid.shape == (1, 32, 32, 2) and grid.abs().max() <= 1.0


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("sticker", {}, "unknown trigger kind 'sticker' \\(--trigger\\): choose one of patch"),
        ("patch", {"alpha": 0.1}, "patch trigger has no parameter alpha: its parameters are size"),
        ("patch", {"size": 0}, "patch size in pixels must be at least 1, got 0"),
        ("patch", {"size": 1.5}, "fraction of the image must be in \\(0, 1\\], got 1.5"),
        ("patch", {"position": "middle"}, "patch position 'middle' is not valid"),
        ("blend", {"alpha": 0.0}, "blend alpha must be a number in \\(0, 1\\], got 0.0"),
        (
            "wanet",
            {"k": 1},
            "wanet k \\(control points per side\\) must be an int in \\[2, 64\\], got 1",
        ),
        ("wanet", {"strength": -1.0}, "wanet strength must be a positive number"),
        ("blend", {"seed": -2}, "trigger seed must be a non-negative integer, got -2"),
    ],
)
def test_bad_parameters_are_named(kind: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_trigger(kind, **params)


def test_from_dict_needs_a_kind() -> None:
    with pytest.raises(ValueError, match="a trigger dict needs a 'kind' key"):
        trigger_from_dict({"alpha": 0.2})


def test_apply_rejects_what_is_not_an_image() -> None:
    with pytest.raises(TypeError, match="PIL images, got ndarray"):
        PatchTrigger().apply(np.zeros((4, 4, 3), dtype=np.uint8))
