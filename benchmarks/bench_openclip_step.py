"""OpenCLIP training-step time with and without RoCLIP, measured side by side in one run.

A full step (forward under autocast, loss, backward, AdamW step, logit-scale clamp) on random
data, cycling through a plain CLIP step and one RoCLIP step per matcher precision, so that drift
of the machine hits every kind alike. RoCLIP runs in a matching step against a full pool (the
expensive case: lookup, loss, enqueue). Prints the medians and each overhead and, with --json,
writes them; nothing is asserted.

The spread is reported beside the overhead: the plain step's median over the first half of the
steps minus its median over the second half. An overhead smaller than that is noise.

``--model`` takes an OpenCLIP model name (``ViT-B-32``), ``tiny`` (a local toy config), or a
kit preset of :data:`roclip_kit.train.openclip.PRESETS` (``small-gpu``, ``tiny-cpu``), which is how
the ``small-gpu`` preset's speed is measured.

    python benchmarks/bench_openclip_step.py                       # CPU, tiny model
    python benchmarks/bench_openclip_step.py --device cuda --model ViT-B-32 --batch 256 \
        --precision bf16 --pool 65536 --matcher-precision fp32 bf16 --json step.json
    python benchmarks/bench_openclip_step.py --device cuda --model small-gpu --batch 256 \
        --precision bf16 --pool 16384 --matcher-precision fp32
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import open_clip
import torch

from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager
from roclip_plugin.loss import DistInfo

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build(model_name: str, device: torch.device) -> torch.nn.Module:
    """The model, in training mode: a local toy config, a kit preset, or an OpenCLIP name."""
    if model_name == "tiny":
        model = open_clip.model.CLIP(**TINY, output_dict=True)
    else:
        from roclip_kit.train.openclip import PRESETS

        if model_name in PRESETS:
            model = open_clip.model.CLIP(**PRESETS[model_name], output_dict=True)
        else:
            model = open_clip.create_model(model_name, pretrained=None, output_dict=True)
    return model.to(device).train()


def summary(samples: list[float], batch: int) -> dict[str, float]:
    """Median, extremes and pairs per second of one kind of step (milliseconds)."""
    median = statistics.median(samples)
    return {
        "median_ms": median,
        "min_ms": min(samples),
        "max_ms": max(samples),
        "pairs_per_s": batch / (median * 1e-3),
    }


def spread_ms(samples: list[float]) -> float:
    """|median of the first half - median of the second half|: the same step timed twice."""
    half = len(samples) // 2
    if half == 0:
        return 0.0
    return abs(statistics.median(samples[:half]) - statistics.median(samples[half:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pool", type=int, default=65536)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind")
    parser.add_argument(
        "--matcher-precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["bf16"],
        help="one RoCLIP step kind per precision (the OpenCLIP flag --roclip-precision)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build(args.model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(args.batch, 3, size, size, device=device)
    texts = torch.randint(1, 49407, (args.batch, model.context_length), device=device)
    dim = model.text_projection.shape[1]
    kinds: dict[str, Callable[..., torch.Tensor]] = {"clip": open_clip.ClipLoss()}
    for precision in dict.fromkeys(args.matcher_precision):
        config = RoClipConfig(
            pool_size=args.pool, first_defended_epoch=0, defend_every=1, precision=precision
        )
        defense = RoClipDefense(
            config,
            plugin_manager=get_plugin_manager(autoload=False),
            dist_info=DistInfo(),
            device=device,
        )
        defense.pool.enqueue(torch.randn(args.pool, dim, device=device))
        defense.start_epoch(0)
        kinds[f"roclip_{precision}"] = defense.loss
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step(loss_fn: Callable[..., torch.Tensor]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(args.warmup):  # warm-up every path
        for loss_fn in kinds.values():
            step(loss_fn)
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.steps):
        for name, loss_fn in kinds.items():
            samples[name].append(step(loss_fn))
    figures = {name: summary(values, args.batch) for name, values in samples.items()}
    plain = figures["clip"]["median_ms"]
    for name in kinds:
        if name != "clip":
            figures[name]["overhead_ms"] = figures[name]["median_ms"] - plain
            figures[name]["overhead_pct"] = 100 * figures[name]["overhead_ms"] / plain
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict[str, Any] = {
        "device": where,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "date": str(date.today()),
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "pool": args.pool,
        "steps": args.steps,
        "warmup": args.warmup,
        "clip_spread_ms": spread_ms(samples["clip"]),
        "kinds": figures,
    }
    print(f"device: {where}; torch {torch.__version__}; {date.today()}")
    print(
        f"model {args.model}, batch {args.batch}, {args.precision}, pool {args.pool:,}, "
        f"{args.steps} steps of each kind in turn after {args.warmup} warm-up"
    )
    for name, f in figures.items():
        line = (
            f"{name:12s} median {f['median_ms']:9.2f} ms (min {f['min_ms']:.2f}, "
            f"max {f['max_ms']:.2f}), {f['pairs_per_s']:,.0f} pairs/s"
        )
        if "overhead_ms" in f:
            line += f"; overhead {f['overhead_ms']:.2f} ms = {f['overhead_pct']:.2f}%"
        print(line)
    spread = results["clip_spread_ms"]
    print(f"spread of the CLIP step (first half vs second half): {spread:.2f} ms")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
