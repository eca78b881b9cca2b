"""RoCLIP's image augmentation: both paths, on real photos, against torchvision and each other."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

pytest.importorskip("torchvision")
PIL_Image = pytest.importorskip("PIL.Image")

import torchvision.transforms as T  # noqa: E402, N812
import torchvision.transforms.functional as TF  # noqa: E402, N812

from roclip_plugin.augment import AugmentationPolicy, build_policy, preprocess_size  # noqa: E402
from roclip_plugin.augment.image import (  # noqa: E402
    INSTALL_HINT,
    SMALL_IMAGE_SPEC,
    ImageAugSpec,
    RoClipImageAugment,
    adjust_hue,
    color_jitter,
    crop_flip_batch,
    draw_params,
    gaussian_blur,
    rgb_to_gray,
    roclip_image_factory,
)
from roclip_plugin.augment.keys import STREAM_IMAGE  # noqa: E402
from roclip_plugin.config import RoClipConfig  # noqa: E402
from roclip_plugin.plugins import get_plugin_manager  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUG = RoClipImageAugment()
ONLY_FLIP = ImageAugSpec(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_kernel=1
)


def _photos() -> list:
    """Real photographs shipped with scikit-learn (no download), and crops of other sizes."""
    datasets = pytest.importorskip("sklearn.datasets")
    china, flower = (PIL_Image.fromarray(a) for a in datasets.load_sample_images().images)
    return [china, flower, china.crop((100, 50, 551, 350)), flower.crop((200, 100, 350, 300))]


PHOTOS = _photos()


def _tensor(image, size: int | None = None) -> torch.Tensor:
    if size is not None:
        image = image.resize((size, size), PIL_Image.Resampling.BICUBIC)
    return TF.pil_to_tensor(image).float() / 255.0


def _policy(**kwargs) -> AugmentationPolicy:
    return AugmentationPolicy(image=RoClipImageAugment(), **kwargs)


def _openclip_like_preprocess(size: int = 224) -> T.Compose:
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def _params(n: int, height: int, width: int, spec: ImageAugSpec | None = None, epoch: int = 0):
    key = (0, epoch, torch.arange(n), STREAM_IMAGE)
    return draw_params(spec or ImageAugSpec(), key, height, width)


# -- the CPU path -------------------------------------------------------------------------------


def test_cpu_path_composes_with_the_model_preprocessing() -> None:
    transform = _policy().image_transform(_openclip_like_preprocess())
    assert transform.size == (224, 224)
    low = [(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    high = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    for i, photo in enumerate(PHOTOS):
        out = transform(photo, index=i)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        for c in range(3):
            assert low[c] - 1e-4 <= out[c].min() and out[c].max() <= high[c] + 1e-4
        assert out.std() > 0.05  # an image, not a constant


def test_cpu_path_pil_and_tensor_outputs() -> None:
    policy = _policy()
    photo = PHOTOS[1]
    out = policy.augment_image(photo, index=0, size=96)
    assert out.size == (96, 96) and out.mode == "RGB"
    gray_input = photo.convert("L")
    assert policy.augment_image(gray_input, index=0, size=(64, 80)).size == (80, 64)
    as_uint8 = TF.pil_to_tensor(photo)
    out = policy.augment_image(as_uint8, index=0, size=(64, 80))
    assert out.shape == (3, 64, 80) and out.dtype == torch.uint8
    out = policy.augment_image(as_uint8.float() / 255, index=0, size=48)
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    out = policy.augment_image(as_uint8[:1].float() / 255, index=0)
    assert out.shape == (3, *as_uint8.shape[1:])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        policy.augment_image(torch.zeros(4, 8, 8), index=0)


def test_preprocess_size() -> None:
    assert preprocess_size(_openclip_like_preprocess(160)) == (160, 160)
    assert preprocess_size(T.Compose([T.Resize(96), T.ToTensor()])) == (96, 96)
    assert preprocess_size(T.Compose([T.CenterCrop((64, 80))])) == (64, 80)
    assert preprocess_size(None) is None
    assert _policy().image_transform(None).size == (224, 224)
    assert _policy().image_transform(None, size=32).size == (32, 32)


def test_blur_kernel_scales_with_small_images() -> None:
    spec = ImageAugSpec()
    assert spec.kernel_size(224, 224) == 21
    assert spec.kernel_size(1000, 600) == 21
    assert spec.kernel_size(100, 300) == 9
    assert spec.kernel_size(64, 64) == 5
    assert spec.kernel_size(32, 32) == 3
    assert spec.kernel_size(8, 8) == 3
    assert ImageAugSpec(blur_kernel=1).kernel_size(224, 224) == 1


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="flip_p"):
        ImageAugSpec(flip_p=1.5)
    with pytest.raises(ValueError, match="blur_kernel"):
        ImageAugSpec(blur_kernel=20)
    with pytest.raises(ValueError, match="crop_scale"):
        ImageAugSpec(crop_scale=(0.0, 1.0))


# -- parameter distribution ---------------------------------------------------------------------


def test_parameter_rates_match_the_configured_probabilities() -> None:
    n = 20_000
    p = _params(n, 300, 451)
    assert abs(p.flip.double().mean() - 0.5) < 0.02
    assert abs(p.jitter.double().mean() - 0.8) < 0.02
    assert abs(p.gray.double().mean() - 0.2) < 0.02
    assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0
    assert abs(p.sigma.double().mean() - 1.05) < 0.02
    f = p.factors[p.jitter]
    for col, (low, high) in enumerate([(0.5, 1.5), (0.5, 1.5), (0.5, 1.5), (-0.1, 0.1)]):
        assert low <= f[:, col].min() and f[:, col].max() <= high
        assert abs(f[:, col].double().mean() - (low + high) / 2) < 0.01
    assert (p.factors[~p.jitter] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
    assert (p.order.sort(1).values == torch.arange(4)).all()  # permutations
    assert abs((p.order[:, 0] == 3).double().mean() - 0.25) < 0.02  # uniform order


def test_crop_boxes_follow_torchvision_random_resized_crop() -> None:
    n, height, width = 4000, 300, 451
    p = _params(n, height, width)
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= height).all() and (p.left + p.width <= width).all()
    ours_area = p.crop_area_fraction(torch.tensor(height), torch.tensor(width)).float()
    ours_ratio = (p.width / p.height).float()
    torch.manual_seed(0)
    blank = torch.zeros(1, height, width)
    get_params = T.RandomResizedCrop.get_params
    boxes = [get_params(blank, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    ref = torch.tensor(boxes, dtype=torch.float64)
    ref_area = (ref[:, 2] * ref[:, 3] / (height * width)).float()
    ref_ratio = (ref[:, 3] / ref[:, 2]).float()
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert (ours_area.quantile(qs) - ref_area.quantile(qs)).abs().max() < 0.03
    assert (ours_ratio.quantile(qs) - ref_ratio.quantile(qs)).abs().max() < 0.03
    assert ours_area.min() >= 0.07 and ours_area.max() <= 1.0
    centre_ref = (ref[:, 1] + ref[:, 3] / 2) / width
    centre = ((p.left + p.width / 2) / width).double()
    assert abs(centre.mean() - centre_ref.mean()) < 0.01


def test_fallback_is_a_centred_crop_clipped_to_the_ratio_range() -> None:
    p = _params(64, 10, 400)  # far too wide: no random try fits the ratio range
    assert (p.height == 10).all() and (p.width == round(10 * 4 / 3)).all()
    assert (p.left == (400 - 13) // 2).all() and (p.top == 0).all()


# -- the colour operations reproduce torchvision ------------------------------------------------


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.stack([_tensor(photo, 48) for photo in PHOTOS])


def test_luma_hue_and_blur_match_torchvision(batch: torch.Tensor) -> None:
    assert torch.allclose(rgb_to_gray(batch), TF.rgb_to_grayscale(batch), atol=1e-6)
    shifts = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    ours = adjust_hue(batch, shifts)
    for i, shift in enumerate(shifts.tolist()):
        assert torch.allclose(ours[i], TF.adjust_hue(batch[i], shift), atol=2e-5)
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    blurred = gaussian_blur(batch, sigmas, 9)
    for i, sigma in enumerate(sigmas.tolist()):
        expected = TF.gaussian_blur(batch[i], [9, 9], [sigma, sigma])
        assert torch.allclose(blurred[i], expected, atol=1e-5)


def test_color_jitter_matches_torchvision_in_each_order(batch: torch.Tensor) -> None:
    p = _params(64, 48, 48)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    images = batch.repeat(16, 1, 1, 1)
    ours = color_jitter(images, p)
    for i in range(images.shape[0]):
        expected = images[i]
        if p.jitter[i]:
            for op in p.order[i].tolist():
                expected = ops[op](expected, p.factors[i, op].item())
        assert torch.allclose(ours[i], expected, atol=3e-5), i


def test_crop_and_flip_match_a_per_image_resize(batch: torch.Tensor) -> None:
    p = _params(4, 48, 48)
    out = crop_flip_batch(batch, p, (40, 40))
    for i in range(4):
        t, lft, h, w = (int(v[i]) for v in (p.top, p.left, p.height, p.width))
        crop = batch[i : i + 1, :, t : t + h, lft : lft + w]
        expected = F.interpolate(crop, size=(40, 40), mode="bilinear", align_corners=False)[0]
        expected = expected.flip(-1) if p.flip[i] else expected
        assert torch.allclose(out[i], expected, atol=1e-5)


# -- both paths agree ---------------------------------------------------------------------------


def test_tensor_cpu_path_equals_the_batch_path_per_sample() -> None:
    image = _tensor(PHOTOS[0], 64)
    policy = _policy()
    n = 48
    batched = policy.gpu_batch(image.expand(n, -1, -1, -1), 2, torch.arange(n))
    for i in range(n):
        single = policy.augment_image(image, index=i, epoch=2, size=64)
        assert (single - batched[i]).abs().max() < 1e-4, i


def test_pil_cpu_path_agrees_with_the_batch_path_per_sample() -> None:
    photo = PHOTOS[1].resize((64, 64), PIL_Image.Resampling.BICUBIC)
    policy = _policy()
    n = 48
    batched = policy.gpu_batch(_tensor(photo).expand(n, -1, -1, -1), 0, torch.arange(n))
    diffs = [
        (_tensor(policy.augment_image(photo, index=i, epoch=0, size=64)) - batched[i]).abs().mean()
        for i in range(n)
    ]
    assert max(diffs) < 0.015  # uint8 rounding and PIL's resampling only


def _stats(images: torch.Tensor, source: torch.Tensor) -> dict[str, float]:
    gray = (images.amax(1) - images.amin(1)).amax((1, 2)) < 1e-3
    brightness = images.mean((1, 2, 3)) - source.mean()
    return {
        "gray": gray.double().mean().item(),
        "brightness": brightness.mean().item(),
        "brightness_sd": brightness.std().item(),
        "contrast": images.std((1, 2, 3)).mean().item(),
    }


def test_paths_agree_in_distribution_on_full_resolution_photos() -> None:
    # The CPU path crops the photo at full resolution, the batched path crops the model-size
    # image: outputs differ in detail, not in distribution.
    photo = PHOTOS[0].crop((100, 0, 527, 427))  # square: both paths see the same content
    small = _tensor(photo, 64)
    policy = _policy()
    n = 160
    cpu = torch.stack([_tensor(policy.augment_image(photo, index=i, size=64)) for i in range(n)])
    gpu = policy.gpu_batch(small.expand(n, -1, -1, -1), 0, torch.arange(n))
    a, b = _stats(cpu, small), _stats(gpu, small)
    assert abs(a["gray"] - b["gray"]) < 0.02
    assert abs(a["brightness"] - b["brightness"]) < 0.01
    assert abs(a["brightness_sd"] - b["brightness_sd"]) < 0.01
    assert abs(a["contrast"] - b["contrast"]) < 0.01
    assert 0.1 < a["gray"] < 0.3
    assert (cpu - gpu).abs().mean() < 0.05  # the same parameters per sample on both paths


def test_measured_rates_on_outputs() -> None:
    photo = _tensor(PHOTOS[2], 32)
    n = 400
    out = _policy().gpu_batch(photo.expand(n, -1, -1, -1), 0, torch.arange(n))
    gray = ((out.amax(1) - out.amin(1)).amax((1, 2)) < 1e-3).double().mean()
    assert abs(gray - 0.2) < 0.06
    flip_only = AugmentationPolicy(image=RoClipImageAugment(ONLY_FLIP))
    out = flip_only.gpu_batch(photo.expand(n, -1, -1, -1), 0, torch.arange(n))
    flipped = ((out - photo.flip(-1)).abs().amax((1, 2, 3)) < 0.01).double()
    unflipped = ((out - photo).abs().amax((1, 2, 3)) < 0.01).double()
    assert (flipped + unflipped == 1).all()
    assert abs(flipped.mean() - 0.5) < 0.07


# -- the batched path's interface ---------------------------------------------------------------


def test_gpu_batch_normalised_and_uint8_inputs(batch: torch.Tensor) -> None:
    policy = _policy()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    plain = policy.gpu_batch(batch, 1, [3, 1, 4, 1])
    normed = policy.gpu_batch((batch - mean) / std, 1, [3, 1, 4, 1], mean=CLIP_MEAN, std=CLIP_STD)
    assert torch.allclose(normed * std + mean, plain, atol=1e-5)
    as_uint8 = (batch * 255).round().to(torch.uint8)
    out = policy.gpu_batch(as_uint8, 1, [3, 1, 4, 1])
    assert out.dtype == torch.uint8
    assert (out.float() - plain * 255).abs().max() <= 1.5
    empty = batch[:0]
    assert policy.gpu_batch(empty, 1, []) is empty
    assert policy.gpu_batch(torch.rand(2, 3, 1, 1), 0, [0, 1]).shape == (2, 3, 1, 1)
    with pytest.raises(ValueError, match="both mean and std"):
        policy.gpu_batch(batch, 1, [3, 1, 4, 1], mean=CLIP_MEAN)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        policy.gpu_batch(batch[:, :1], 1, [3, 1, 4, 1])
    with pytest.raises(ValueError, match="3 sample indices for a batch of 4"):
        policy.gpu_batch(batch, 1, [3, 1, 4])


def test_reproducible_per_seed_epoch_index(batch: torch.Tensor) -> None:
    a = _policy(seed=5).gpu_batch(batch, 3, [10, 11, 12, 13])
    assert torch.equal(a, _policy(seed=5).gpu_batch(batch, 3, [10, 11, 12, 13]))
    assert torch.equal(a[1:3], _policy(seed=5).gpu_batch(batch[1:3], 3, [11, 12]))
    assert not torch.allclose(a, _policy(seed=5).gpu_batch(batch, 4, [10, 11, 12, 13]))
    assert not torch.allclose(a, _policy(seed=6).gpu_batch(batch, 3, [10, 11, 12, 13]))
    fixed = _policy(seed=5, image_refresh="run")
    first = fixed.gpu_batch(batch, 0, [1, 2, 3, 4])
    assert torch.equal(first, fixed.gpu_batch(batch, 9, [1, 2, 3, 4]))
    policy = _policy(seed=5)
    policy.set_epoch(3)
    assert torch.equal(policy.gpu_batch(batch, indices=[10, 11, 12, 13]), a)


def test_none_image_augmentation_is_the_identity(batch: torch.Tensor) -> None:
    config = RoClipConfig(image_aug="none", eda_synonyms="off")
    policy = build_policy(config, get_plugin_manager())
    assert policy.gpu_batch(batch, 0, [0, 1, 2, 3]) is batch
    photo = PHOTOS[0]
    assert policy.image_transform(None)(photo) is photo


@pytest.mark.gpu
def test_batch_path_on_cuda_matches_cpu(batch: torch.Tensor) -> None:
    policy = _policy()
    indices = torch.arange(256)
    images = torch.stack([_tensor(p, 224) for p in PHOTOS]).repeat(64, 1, 1, 1)
    cpu = policy.gpu_batch(images, 0, indices)
    cuda = policy.gpu_batch(images.cuda(), 0, indices.cuda())
    assert cuda.is_cuda and cuda.shape == (256, 3, 224, 224)
    assert (cuda.cpu() - cpu).abs().max() < 1e-3
    half = policy.gpu_batch(images.cuda().bfloat16(), 0, indices)
    assert half.dtype == torch.bfloat16 and (half.float().cpu() - cpu).abs().mean() < 0.01


# -- dependencies -------------------------------------------------------------------------------


def test_missing_torchvision_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"pip install 'roclip-plugin\[augment\]'"):
        roclip_image_factory(RoClipConfig())
    with pytest.raises(ImportError, match=r"roclip-plugin\[augment\]"):
        build_policy(RoClipConfig(eda_synonyms="off"), get_plugin_manager())
    assert "[augment]" in INSTALL_HINT


def test_uniform_crop_positions() -> None:
    p = _params(8000, 64, 64, ImageAugSpec(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0)))
    assert (p.height == 32).all() and (p.width == 32).all()
    counts = torch.bincount(p.left, minlength=33).double()
    assert counts.numel() == 33
    expected = 8000 / 33
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 32 + 4 * math.sqrt(2 * 32)  # uniform over the 33 positions


def test_small_image_set_never_flips_greys_or_shifts_hue() -> None:
    policy = build_policy(RoClipConfig(image_aug="roclip-small"), get_plugin_manager())
    spec = policy.image.spec
    assert spec == SMALL_IMAGE_SPEC and spec.crop_scale == (0.5, 1.0)
    params = draw_params(spec, (0, 3, torch.arange(4000), STREAM_IMAGE), 32, 32)
    assert not params.flip.any() and not params.gray.any()
    assert torch.all(params.factors[:, 3] == 0.0)  # hue
    area = params.crop_area_fraction(torch.tensor(32), torch.tensor(32))
    assert area.min() >= 0.5 * 0.9  # integer boxes round the 0.5 area a little
    assert params.jitter.float().mean() == pytest.approx(spec.jitter_p, abs=0.03)


def test_light_image_set_is_the_small_set_with_a_crop_of_at_least_four_fifths() -> None:
    policy = build_policy(RoClipConfig(image_aug="roclip-light"), get_plugin_manager())
    spec = policy.image.spec
    assert spec == replace(SMALL_IMAGE_SPEC, crop_scale=(0.8, 1.0))
    params = draw_params(spec, (0, 3, torch.arange(4000), STREAM_IMAGE), 32, 32)
    area = params.crop_area_fraction(torch.tensor(32), torch.tensor(32))
    assert area.min() >= 0.8 * 0.9  # integer boxes round the 0.8 area a little
    assert area.min() < 0.85  # the range's low end is drawn, not only whole images
    assert not params.flip.any() and not params.gray.any()


def test_a_zero_hue_shift_is_skipped_as_torchvision_skips_hue_zero(monkeypatch) -> None:
    import roclip_plugin.augment.image as augment_image

    params = draw_params(SMALL_IMAGE_SPEC, (0, 0, torch.arange(64), STREAM_IMAGE), 8, 8)
    calls = []
    monkeypatch.setattr(augment_image, "adjust_hue", lambda x, s: calls.append(1) or x)
    color_jitter(torch.rand(64, 3, 8, 8), params)
    assert calls == []
