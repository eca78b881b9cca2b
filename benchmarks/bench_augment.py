"""Time RoCLIP's augmentations side by side with the transforms trainers already run.

CPU, one thread (what one DataLoader worker gets: PyTorch sets one thread per worker):

- images per second at 224 px for OpenCLIP's default training transform
  (``open_clip.image_transform(224, is_train=True)``: a mild resized crop), for RoCLIP's CPU
  path composed with OpenCLIP's evaluation preprocessing (the full authors' augmentation, then
  resize, crop and normalise), and for the same augmentation written with torchvision's own
  transforms (the authors' code path), all on the same real photographs (scikit-learn's samples);
- captions per second for EDA alone and for OpenCLIP's tokenizer with and without the
  augmenting wrapper.

With ``--device cuda`` it also times the batched path on a batch of 256 images at 224 px (CUDA
events, median of repeats after warm-up); on the CPU it times that batch with every thread.
Nothing is asserted: it prints what it measured, on which device. ``--batched-only`` skips
the per-worker CPU figures (a minute of one core, and the same on every machine class) when
only the batched path's time is wanted, as in the GPU evidence run.

    python benchmarks/bench_augment.py
    python benchmarks/bench_augment.py --device cuda --json augment-gpu.json
    python benchmarks/bench_augment.py --device cuda --batched-only --json augment-gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import torch
from timing import timed

from roclip_plugin import get_plugin_manager
from roclip_plugin.augment import build_policy
from roclip_plugin.config import RoClipConfig


def photos() -> list[Any]:
    """Real photographs shipped with scikit-learn (427 x 640), or noise images without it."""
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images

        return [Image.fromarray(a) for a in load_sample_images().images]
    except ImportError:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, (2, 427, 640, 3), generator=generator, dtype=torch.uint8)
        return [Image.fromarray(a.numpy()) for a in noise]


def captions(count: int) -> list[str]:
    """Plausible captions (10 to 20 words) from a fixed vocabulary, deterministic."""
    rng = random.Random(0)
    subjects = "dog cat man woman child car bus bird horse boat train plane table bike".split()
    adjectives = "red small old young happy large white black wooden bright empty busy".split()
    places = "street beach park kitchen field road river room city forest market".split()
    verbs = "sits stands runs walks plays waits looks rests lies drives".split()
    out = []
    for _ in range(count):
        words = ["a", rng.choice(adjectives), rng.choice(subjects), rng.choice(verbs), "in"]
        words += ["the", rng.choice(adjectives), rng.choice(places)]
        while len(words) < rng.randint(10, 20):
            words += ["near", "a", rng.choice(adjectives), rng.choice(subjects)]
        out.append(" ".join(words))
    return out


def rate(fn: Callable[[int], object], count: int, repeat: int = 3) -> float:
    """Items per second of ``fn(i)`` for ``i < count``: best of ``repeat`` passes."""
    fn(0)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return count / best


def cpu_images(policy: Any, count: int) -> dict[str, float]:
    """Images per second per worker (one thread) for the three transforms."""
    import open_clip
    import torchvision.transforms as T  # noqa: N812

    images = photos()
    openclip_train = open_clip.image_transform(224, is_train=True)
    openclip_eval = open_clip.image_transform(224, is_train=False)
    roclip = policy.image_transform(openclip_eval)
    torchvision_authors = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.GaussianBlur(21, sigma=(0.1, 2.0)),
            openclip_eval,
        ]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "openclip_train_transform": rate(lambda i: openclip_train(images[i % 2]), count),
            "roclip_cpu_path": rate(lambda i: roclip(images[i % 2], index=i), count),
            "torchvision_authors_pipeline": rate(
                lambda i: torchvision_authors(images[i % 2]), count
            ),
        }
    finally:
        torch.set_num_threads(threads)


def cpu_texts(policy: Any, count: int) -> dict[str, float]:
    """Captions per second (one thread): EDA alone, and tokenizing with and without it."""
    import open_clip

    texts = captions(count)
    tokenizer = open_clip.get_tokenizer("RN50")
    wrapped = policy.tokenizer(tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "eda": rate(lambda i: policy.text(texts[i], index=i), count),
            "openclip_tokenizer": rate(lambda i: tokenizer([texts[i]]), count),
            "openclip_tokenizer_with_eda": rate(lambda i: wrapped([texts[i]], indices=[i]), count),
        }
    finally:
        torch.set_num_threads(threads)


def batched(policy: Any, device: torch.device, batch: int, size: int, repeat: int) -> float:
    """Milliseconds for one batch of ``batch`` images at ``size`` px on ``device``."""
    images = torch.rand(batch, 3, size, size, device=device)
    indices = torch.arange(batch)
    return timed(lambda: policy.gpu_batch(images, 0, indices), device, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--images", type=int, default=200, help="images per CPU pass")
    parser.add_argument("--captions", type=int, default=3000, help="captions per pass")
    parser.add_argument("--batch", type=int, default=256, help="batched path: batch size")
    parser.add_argument("--size", type=int, default=224, help="batched path: image side")
    parser.add_argument("--repeat", type=int, default=10, help="batched path: timed repeats")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--batched-only", action="store_true", help="time only the batched path")
    args = parser.parse_args()
    device = torch.device(args.device)
    policy = build_policy(RoClipConfig(), get_plugin_manager())
    source = policy.text_augment.synonyms
    results: dict[str, Any] = {
        "date": date.today().isoformat(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "synonyms": repr(source),
    }
    if not args.batched_only:
        results["images_per_s_per_worker"] = cpu_images(policy, args.images)
        results["captions_per_s_per_worker"] = cpu_texts(policy, args.captions)
    if device.type == "cuda":
        results["device"] = torch.cuda.get_device_name(device)
    else:
        results["device"] = f"cpu ({torch.get_num_threads()} threads)"
        args.repeat = min(args.repeat, 3)
    ms = batched(policy, device, args.batch, args.size, args.repeat)
    results["batched"] = {"batch": args.batch, "size": args.size, "ms": ms}

    print(f"{results['date']}  torch {results['torch']}  {platform.machine()}  {source!r}")
    if not args.batched_only:
        print("\nimages/s per worker (1 thread, 224 px, real 427x640 photos)")
        for name, value in results["images_per_s_per_worker"].items():
            print(f"  {name:32s} {value:8.1f}")
        print("\ncaptions/s per worker (1 thread, 10 to 20 words)")
        for name, value in results["captions_per_s_per_worker"].items():
            print(f"  {name:32s} {value:8.1f}")
    per_image = ms / args.batch
    print(
        f"\nbatched path on {results['device']}: {args.batch} x {args.size} px in {ms:.1f} ms "
        f"({1e3 / per_image:.0f} images/s)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
