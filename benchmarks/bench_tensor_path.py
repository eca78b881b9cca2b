"""Pairs a second of the tensor-resident path against roclip-openclip-train, side by side.

The same image and text towers (the ``tensor-cpu`` preset: OpenCLIP's ``CLIP`` with a small
ResNet image tower), the same poisoned captioned MNIST rows, batch size, optimiser recipe and
RoCLIP settings (the demo's: image augmentation ``roclip-small``, EDA captions, matching from
the first epoch against a pool of 4,096), trained once through OpenCLIP's CSV training script
with the adapter (``roclip-openclip-train``: PNG decoding, per-sample transforms, BPE
tokenising; OpenCLIP's 49,408-token vocabulary) and once on the tensor-resident path
(``roclip_kit.train.tensor``: tensors in memory, batched augmentation, a word vocabulary).
Each path's figure is its median per-step throughput (OpenCLIP's own per-step log line; the
tensor path's step times), data loading included. Both runs use every thread of the machine,
one after the other; each is run ``--repeat`` times alternately. Nothing is asserted.

    python benchmarks/bench_tensor_path.py                        # 10,240 MNIST rows, 1 epoch
    python benchmarks/bench_tensor_path.py --train-limit 20480 --repeat 2
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from roclip_kit.attack.poison import poison_dataset
from roclip_kit.data.datasets import build_captioned_dataset
from roclip_kit.data.tensors import load_poisoned
from roclip_kit.train.openclip import TrainSettings, train_openclip
from roclip_kit.train.tensor import TENSOR_PRESETS, TensorTrainSettings, train_tensor

from roclip_plugin import RoClipConfig

FLAGS = {
    "pool_size": 4096,
    "first_defended_epoch": 0,
    "defend_every": 1,
    "image_aug": "roclip-small",
    "text_aug": "eda",
}
RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s,")


def openclip_preset(context: int) -> dict[str, Any]:
    """The tensor-cpu towers with OpenCLIP's BPE vocabulary (what its tokenizer needs)."""
    preset = TENSOR_PRESETS["tensor-cpu"]
    text = {**preset["text_cfg"], "vocab_size": 49408, "context_length": context}
    return {"embed_dim": preset["embed_dim"], "vision_cfg": preset["vision_cfg"], "text_cfg": text}


def openclip_rate(poisoned: Path, work: Path, roclip: bool, args: argparse.Namespace) -> float:
    """Median samples a second over the steps of one epoch (the first few left out)."""
    name = f"openclip-{'roclip' if roclip else 'clip'}-{time.monotonic_ns()}"
    settings = TrainSettings(
        out_dir=work,
        name=name,
        dataset_dir=poisoned,
        roclip=roclip,
        roclip_flags=FLAGS if roclip else {},
        preset=openclip_preset(TENSOR_PRESETS["tensor-cpu"]["text_cfg"]["context_length"]),
        epochs=1,
        batch_size=args.batch_size,
        lr=2e-3,
        warmup=10,
        extra_args=("--log-every-n-steps", "1"),
    )
    result = train_openclip(settings)
    rates = [float(m.group(1)) for m in RATE.finditer(result.log_path.read_text())]
    return statistics.median(rates[args.skip :])


def tensor_rate(poisoned: Path, roclip: bool, args: argparse.Namespace) -> float:
    """Median pairs a second over the steps of one epoch (the first few left out)."""
    data = load_poisoned(poisoned)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(_: int) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    settings = TensorTrainSettings(epochs=1, batch_size=args.batch_size, lr=2e-3, warmup_steps=10)
    config = RoClipConfig(**FLAGS) if roclip else None
    last[0] = time.perf_counter()
    train_tensor(data, settings, config, on_step=on_step)
    return args.batch_size / statistics.median(times[args.skip :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or digits")
    parser.add_argument("--train-limit", type=int, default=10240)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="alternating runs of each path")
    parser.add_argument("--skip", type=int, default=3, help="first steps left out")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        data = build_captioned_dataset(
            args.dataset, work / "data", train_limit=args.train_limit, test_limit=200,
            attribute_rate=0.5,
        )  # fmt: skip
        poisoned = poison_dataset(
            work / "poisoned", dataset_dir=data.root, targets=16, captions_per_target=[10, 50],
            backdoor_rate=0.001, backdoor_class=data.classes[3],
        ).out_dir  # fmt: skip
        rates: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.repeat):
            for roclip in (False, True):
                rates.setdefault(("openclip", roclip), []).append(
                    openclip_rate(poisoned, work / "runs", roclip, args)
                )
                rates.setdefault(("tensor", roclip), []).append(tensor_rate(poisoned, roclip, args))
    cpu = platform.processor() or platform.machine()
    print(
        f"device: {cpu} CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"{date.today()}; {args.dataset}, {args.train_limit} rows, batch {args.batch_size}"
    )
    print("| run | roclip-openclip-train pairs/s | tensor path pairs/s | ratio |")
    print("| --- | --- | --- | --- |")
    for roclip in (False, True):
        oc = statistics.median(rates[("openclip", roclip)])
        tp = statistics.median(rates[("tensor", roclip)])
        label = "RoCLIP (matching, augmentation)" if roclip else "CLIP"
        print(f"| {label} | {oc:.0f} | {tp:.0f} | {tp / oc:.1f}x |")


if __name__ == "__main__":
    main()
