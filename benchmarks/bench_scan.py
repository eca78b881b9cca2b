"""Scan benchmark: how well ``roclip scan``'s detectors find the benchmark's poison, and how fast.

For each (dataset, backdoor rate): build and poison the data as the robustness benchmark does
(the demo's cpu scale: the full training set, 32 targets with 10 or 50 captions, a blended
backdoor at the rate), train plain CLIP on it on the tensor path (or load ``--checkpoint``, a
kit checkpoint such a run saved), embed and score every training pair with
``roclip_kit.evaluate.scan``, and print AUROC and precision@k per detector and attack kind,
the pairs scanned per second, the device and the date. The trained model is saved beside the results
(``clip.pt``) so a rerun can scan without training. Nothing is asserted: it reports what it
measured, to read against issue 23's goals (backdoor AUROC >= 0.99, targeted >= 0.95, 60,000
pairs in 60 s on two CPU cores).

    python benchmarks/bench_scan.py --out scan-bench                      # MNIST, 3 rates
    python benchmarks/bench_scan.py --datasets mnist fashion-mnist --out scan-bench
    python benchmarks/bench_scan.py --quick --out /tmp/scan-bench         # a check of the script
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
from roclip_kit.data.tensors import load_poisoned
from roclip_kit.demo.run import build_data, poison
from roclip_kit.demo.settings import DemoSettings
from roclip_kit.evaluate.scan import (
    detection_report,
    poisoned_by_attack,
    read_pairs,
    scan_pairs,
    use_threads,
)
from roclip_kit.train.loaded import LoadedModel
from roclip_kit.train.models import load_openclip
from roclip_kit.train.tensor import loaded_model, train_tensor

from roclip_plugin.scan import DETECTORS, ScanSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("scan-bench"), help="output folder")
    parser.add_argument("--datasets", nargs="+", default=["mnist"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0005, 0.001, 0.01])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="CLIP's epochs (default: the scale's, 12)")
    parser.add_argument("--checkpoint", type=Path, help="scan with this kit checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=ScanSettings().k)
    parser.add_argument("--reference-size", type=int, default=ScanSettings().reference_size)
    parser.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0: the libraries' defaults)"
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: a check of the script")
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace, dataset: str, rate: float) -> DemoSettings:
    """The demo's cpu scale for one cell; toy sizes with ``--quick``."""
    base = DemoSettings(dataset=dataset, seed=args.seed, backdoor_rate=rate, device=args.device)
    if args.quick:
        base = replace(
            base,
            dataset="digits",
            epochs=args.epochs or 2,
            train_limit=300,
            test_limit=60,
            targets=4,
            captions_per_target=[2, 3],
            batch_size=32,
        )
    elif args.epochs:
        base = replace(base, epochs=args.epochs)
    return base.resolved()


def model_for(
    args: argparse.Namespace, s: DemoSettings, dataset_dir: Path, folder: Path
) -> tuple[LoadedModel, float | None]:
    """``--checkpoint``, else plain CLIP trained on the poisoned data (saved as clip.pt)."""
    if args.checkpoint is not None:
        return load_openclip(args.checkpoint, "(kit checkpoint)", args.device), None
    data = load_poisoned(dataset_dir)
    run = train_tensor(data, s.train_settings(), None, name="clip")
    path = run.save(folder / "clip.pt")
    _log(f"plain CLIP trained in {run.train_seconds:.0f} s, saved as {path}")
    loaded = loaded_model(
        run.model, run.tokenizer, run.cfg, name="clip", checkpoint=path, epoch=len(run.epochs)
    )
    return loaded, run.train_seconds


def scan_cell(args: argparse.Namespace, dataset: str, rate: float) -> dict[str, Any]:
    """Poison, train (or load), scan and judge one cell; its figures as a dict."""
    s = settings_for(args, dataset, rate)
    key = f"{s.dataset}-s{s.seed}-r{rate:g}"
    folder = args.out / key
    data = build_data(s, args.out / "data" / f"{s.dataset}-s{s.seed}", say=_log)
    poisoned = poison(s, data, folder / "poisoned", say=_log)
    loaded, train_seconds = model_for(args, s, poisoned.out_dir, folder)
    pairs = read_pairs(poisoned.csv)
    embeddings = folder / "embeddings"
    shutil.rmtree(embeddings, ignore_errors=True)  # a benchmark times a whole scan
    settings = ScanSettings(k=args.k, reference_size=args.reference_size or None, seed=s.seed)
    result = scan_pairs(loaded, pairs, embeddings, settings, batch_size=args.batch_size)
    detection = detection_report(result.scores, poisoned_by_attack(poisoned.manifest_path, pairs))
    return {
        "cell": key,
        "pairs": len(pairs),
        "poisoned": {g: detection["combined"][g]["k"] for g in detection["combined"]},
        "train_seconds": train_seconds,
        "embed_seconds": result.embed_seconds,
        "score_seconds": result.score_seconds,
        "pairs_per_second": result.pairs_per_second,
        "detection": detection,
    }


def table(cells: list[dict[str, Any]]) -> str:
    """Markdown: AUROC (precision@k) per detector, a column per cell and attack kind."""
    groups = [(c, g) for c in cells for g in ("backdoor", "targeted") if g in c["poisoned"]]
    head = " | ".join(f"{c['cell']} {g} (k={c['poisoned'][g]})" for c, g in groups)
    lines = [f"| detector | {head} |", "|---|" + "---|" * len(groups)]
    for name in DETECTORS:
        cells_text = []
        for c, g in groups:
            f = c["detection"][name][g]
            cells_text.append(f"{f['auroc']:.4f} ({f['precision_at_k']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells_text) + " |")
    lines.append("")
    for c in cells:
        lines.append(
            f"{c['cell']}: {c['pairs']} pairs, embedded in {c['embed_seconds']:.1f} s, scored "
            f"in {c['score_seconds']:.1f} s: {c['pairs_per_second']:.0f} pairs/s"
        )
    return "\n".join(lines)


def device_name(device: str) -> str:
    """The device the scan ran on, in words."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} torch thread(s)"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_threads(args.threads)
    if args.quick:
        args.datasets, args.rates = ["digits"], [0.05]
    cells = [scan_cell(args, d, r) for d in args.datasets for r in args.rates]
    header = f"roclip scan benchmark, {date.today()}, {device_name(args.device)}"
    text = f"{header}\n\n{table(cells)}"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"header": header, "cells": cells}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
