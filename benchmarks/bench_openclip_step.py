"""OpenCLIP training-step time with and without RoCLIP, measured side by side in one run.

A full step (forward under autocast, loss, backward, AdamW step, logit-scale clamp) on random
data, alternating CLIP and RoCLIP steps so that drift of the machine hits both alike. RoCLIP runs
in a matching step against a full pool (the expensive case: lookup, loss, enqueue). Prints the
medians and the overhead; nothing is asserted.

    python benchmarks/bench_openclip_step.py                       # CPU, tiny model
    python benchmarks/bench_openclip_step.py --device cuda --model ViT-B-32 --batch 256 \
        --precision bf16 --pool 65536
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from datetime import date

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
    """The model (a tiny local config when ``model_name`` is ``tiny``), in training mode."""
    if model_name == "tiny":
        model = open_clip.model.CLIP(**TINY, output_dict=True)
    else:
        model = open_clip.create_model(model_name, pretrained=None, output_dict=True)
    return model.to(device).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pool", type=int, default=65536)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--matcher-precision", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build(args.model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(args.batch, 3, size, size, device=device)
    texts = torch.randint(1, 49407, (args.batch, model.context_length), device=device)
    clip_loss = open_clip.ClipLoss()
    config = RoClipConfig(
        pool_size=args.pool,
        first_rematch_epoch=0,
        rematch_every=1,
        precision=args.matcher_precision,
    )
    defense = RoClipDefense(
        config,
        plugin_manager=get_plugin_manager(autoload=False),
        dist_info=DistInfo(),
        device=device,
    )
    dim = model.text_projection.shape[1]
    defense.pool.enqueue(torch.randn(args.pool, dim, device=device))
    defense.start_epoch(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step(loss_fn: torch.nn.Module) -> float:
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

    for _ in range(3):  # warm-up both paths
        step(clip_loss), step(defense.loss)
    plain, roclip = [], []
    for _ in range(args.steps):
        plain.append(step(clip_loss))
        roclip.append(step(defense.loss))
    p, r = statistics.median(plain), statistics.median(roclip)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {where}; torch {torch.__version__}; {date.today()}")
    print(
        f"model {args.model}, batch {args.batch}, {args.precision}, pool {args.pool:,}, "
        f"matcher {args.matcher_precision}, {args.steps} alternating steps each"
    )
    print(f"CLIP step   median {p:9.2f} ms (min {min(plain):.2f}, max {max(plain):.2f})")
    print(f"RoCLIP step median {r:9.2f} ms (min {min(roclip):.2f}, max {max(roclip):.2f})")
    print(f"overhead    {r - p:9.2f} ms = {100 * (r - p) / p:.1f}%")


if __name__ == "__main__":
    main()
