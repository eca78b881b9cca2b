"""Time nearest-caption matching, pool updates and a step's RoCLIP overhead, side by side.

For each batch x pool x dim shape it measures, in one process and one run: a plain bf16 matrix
product of the same shape (the yardstick), a plain float32 product, the exact float32 search,
the bf16 search with certified float32 re-scoring, one enqueue of a batch, and a matching step's
loss (lookup + loss + enqueue) against a plain CLIP loss on the same features. Medians of
repeated runs after warm-up; CUDA timings use events. It prints a table and, with --json, writes
the figures. Nothing is asserted: it reports what it measured, on which device.

    python benchmarks/bench_matching.py                     # CPU, small shapes
    python benchmarks/bench_matching.py --device cuda --shapes full
    python benchmarks/bench_matching.py --shapes quick --repeat 2   # seconds: a check of the script
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch
import torch.nn.functional as F
from timing import timed

from roclip_plugin.loss import DistInfo, RoClipLoss, contrastive_loss
from roclip_plugin.matching import TorchMatcher, highest_matmul_precision, nearest_captions
from roclip_plugin.pool import CaptionPool
from roclip_plugin.step import StepContext, StepDecider

SHAPES = {
    "quick": [(8, 512, 32), (16, 2048, 64)],
    "small": [(256, 65_536, 512), (1024, 65_536, 512), (256, 262_144, 512)],
    "full": [
        (256, 65_536, 512),
        (1024, 65_536, 512),
        (1024, 262_144, 768),
        (4096, 1_048_576, 1024),
    ],
}


def bench_shape(batch: int, pool_rows: int, dim: int, device: torch.device, repeat: int) -> dict:
    """All figures for one shape.

    The random inputs are drawn on ``device`` itself: at 4,096 x 1,048,576 x 1,024 drawing
    and normalising the 4 GiB pool on the host would take longer than every timing of the
    shape together, and a GPU evidence run has minutes, not hours.
    """
    g = torch.Generator(device=device).manual_seed(0)
    pool_t = F.normalize(torch.randn(pool_rows, dim, generator=g, device=device), dim=-1)
    images = torch.randn(batch, dim, generator=g, device=device)
    texts = F.normalize(torch.randn(batch, dim, generator=g, device=device), dim=-1)
    flops = 2 * batch * pool_rows * dim
    a16, b16 = images.bfloat16(), pool_t.bfloat16()

    def mm_bf16() -> object:
        return a16 @ b16.T

    def mm_fp32() -> object:
        with highest_matmul_precision():
            return images @ pool_t.T

    out = {"batch": batch, "pool": pool_rows, "dim": dim}
    out["bf16_matmul_ms"] = timed(mm_bf16, device, repeat)
    out["fp32_matmul_ms"] = timed(mm_fp32, device, repeat)
    for precision in ("fp32", "bf16"):
        out[f"match_{precision}_ms"] = timed(
            lambda p=precision: nearest_captions(images, pool_t, precision=p, pool_normalized=True),
            device,
            repeat,
        )
    pool = CaptionPool(pool_rows, dim, device)
    pool.enqueue(pool_t)
    out["enqueue_ms"] = timed(lambda: pool.enqueue(texts), device, repeat)
    decider = StepDecider(pool, TorchMatcher(), DistInfo())
    criterion = RoClipLoss(DistInfo())
    scale = torch.tensor(50.0, device=device)
    img_n = F.normalize(images, dim=-1)

    def matching_step() -> torch.Tensor:
        """One matching step as the defense runs it: plan, loss, enqueue."""
        plan = decider.plan(img_n, texts, StepContext(matching=True))
        loss = criterion(img_n, texts, scale, plan=plan)
        decider.finish(img_n, texts)
        return loss

    out["matching_step_ms"] = timed(matching_step, device, repeat)
    out["clip_loss_ms"] = timed(
        lambda: contrastive_loss(img_n, texts, scale, DistInfo()), device, repeat
    )
    out["overhead_ms"] = out["matching_step_ms"] - out["clip_loss_ms"]
    for key in ("bf16_matmul", "fp32_matmul", "match_fp32", "match_bf16"):
        out[f"{key}_tflops"] = flops / (out[f"{key}_ms"] * 1e-3) / 1e12
    out["match_fp32_vs_bf16_matmul"] = out["match_fp32_ms"] / out["bf16_matmul_ms"]
    out["match_bf16_vs_bf16_matmul"] = out["match_bf16_ms"] / out["bf16_matmul_ms"]
    return out


def device_name(device: torch.device) -> str:
    """Human-readable device description for the report."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [bench_shape(b, p, d, device, args.repeat) for b, p, d in SHAPES[args.shapes]]
    header = (
        f"{'batch x pool x dim':>24} | bf16 mm ms (TF/s) | fp32 mm ms | match fp32 ms "
        "(x bf16 mm) | match bf16 ms (x bf16 mm) | enqueue ms | step overhead ms"
    )
    print(f"device: {device_name(device)}; torch {torch.__version__}; {date.today()}")
    print(header)
    for r in rows:
        print(
            f"{r['batch']:>6} x {r['pool']:>9,} x {r['dim']:>4} | "
            f"{r['bf16_matmul_ms']:8.2f} ({r['bf16_matmul_tflops']:6.2f}) | "
            f"{r['fp32_matmul_ms']:10.2f} | "
            f"{r['match_fp32_ms']:8.2f} ({r['match_fp32_vs_bf16_matmul']:5.2f}x) | "
            f"{r['match_bf16_ms']:8.2f} ({r['match_bf16_vs_bf16_matmul']:5.2f}x) | "
            f"{r['enqueue_ms']:10.3f} | {r['overhead_ms']:8.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "device": device_name(device),
                    "torch": torch.__version__,
                    "date": str(date.today()),
                    "shapes": args.shapes,
                    "repeat": args.repeat,
                    "rows": rows,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
