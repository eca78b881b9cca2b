"""Robustness benchmark: CLIP vs RoCLIP under targeted poisoning and backdoors, on real images.

For each dataset, seed and backdoor rate it builds the captioned dataset, poisons it (16
targeted images with 100 captions of an adversarial class each, and a patch backdoor at the
rate), trains every variant through OpenCLIP's training script with the adapter, and evaluates
the last checkpoint: clean zero-shot, linear probe, targeted ASR, backdoor ASR, detection. It
prints a markdown table of means and standard deviations over seeds (the rows of the paper's
tables) and writes every figure to a JSON file. Nothing is asserted: it reports what it
measured, with the device and the date.

Variants (``--variants``): ``clip``; ``roclip`` (the default preset with the scale's schedule);
``reference`` (the authors' semantics: match from the second epoch, every K); ``strong``
(matching every epoch after the warm-up); add more with ``--extra NAME:flag=value,...``, for
example ``--extra early:first_rematch_epoch=2`` or ``--extra ramp:schedule=ramp``.

    python benchmarks/bench_robustness.py --device cuda --json robustness.json
    python benchmarks/bench_robustness.py --datasets mnist --extra e:first_rematch_epoch=2
    python benchmarks/bench_robustness.py --quick     # a CPU check of the script (digits)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
from roclip_kit.demo import DemoSettings, build_data, poison, train_and_evaluate

VARIANTS: dict[str, dict[str, Any] | None] = {
    "clip": None,
    "roclip": {},
    "reference": {"preset": "reference"},
    "strong": {"rematch_every": 1},
}
METRICS = ("zero_shot", "linear_probe", "targeted_asr", "backdoor_asr", "detection_recall")


def parse_extra(items: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME:field=value,field=value`` -> {NAME: {field: value}} (values parsed as JSON)."""
    extra = {}
    for item in items:
        name, _, body = item.partition(":")
        flags = {}
        for pair in filter(None, body.split(",")):
            key, _, value = pair.partition("=")
            try:
                flags[key] = json.loads(value)
            except json.JSONDecodeError:
                flags[key] = value
        extra[name] = flags
    return extra


def run_cell(
    base: DemoSettings, dataset: str, seed: int, rate: float, variants: dict[str, Any], out: Path
) -> list[dict[str, Any]]:
    """All variants on one poisoned copy of one dataset."""
    s = replace(base, dataset=dataset, seed=seed, backdoor_rate=rate).resolved()
    data = build_data(s, out / "data" / f"{dataset}-{seed}")
    cell = out / f"{dataset}-seed{seed}-rate{rate:g}"
    poisoned = poison(s, data, cell / "poisoned")
    rows = []
    for name, flags in variants.items():
        run_settings = s if flags is None else _with_flags(s, flags)
        figures = train_and_evaluate(run_settings, cell, poisoned, name, flags is not None)
        rows.append(
            {
                "dataset": dataset,
                "seed": seed,
                "rate": rate,
                "variant": name,
                "matching_epochs": figures.matching_epochs,
                "train_seconds": figures.train_seconds,
                **figures.summary(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _with_flags(s: DemoSettings, flags: dict[str, Any]) -> DemoSettings:
    """``s`` with a variant's RoCLIP flags on top of the scale's (reference drops its schedule)."""
    base = {k: v for k, v in s.roclip_flags.items() if k != "preset"}
    if flags.get("preset") == "reference":
        base = {"pool_size": base["pool_size"]} if "pool_size" in base else {}
    return replace(s, roclip_flags={**base, **flags})


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per (dataset, rate, variant), mean ± std over seeds, in percent."""
    keys = sorted({(r["dataset"], r["rate"], r["variant"]) for r in rows}, key=str)
    lines = [
        "| dataset | backdoor rate | variant | seeds | " + " | ".join(METRICS) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " |",
    ]
    for dataset, rate, variant in keys:
        group = [
            r for r in rows if (r["dataset"], r["rate"], r["variant"]) == (dataset, rate, variant)
        ]
        cells = []
        for metric in METRICS:
            values = [100 * r[metric] for r in group if r.get(metric) is not None]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        lines.append(
            f"| {dataset} | {100 * rate:g}% | {variant} | {len(group)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the grid and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0001, 0.001, 0.01])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--extra", nargs="*", default=[], help="NAME:field=value,... variants")
    parser.add_argument("--epochs", type=int, help="(default: the gpu scale's)")
    parser.add_argument("--out", type=Path, default=Path("robustness"))
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--quick", action="store_true", help="tiny CPU check on digits")
    args = parser.parse_args()
    base = DemoSettings(scale="gpu", device=args.device, targets=16, captions_per_target=100)
    if args.quick:
        args.datasets, args.seeds, args.rates = ["digits"], [0], [0.02]
        base = DemoSettings(
            scale="cpu", device="cpu", epochs=2, train_limit=200, test_limit=80, targets=2,
            captions_per_target=5, batch_size=32, roclip_flags={"first_rematch_epoch": 1,
            "rematch_every": 1, "pool_size": 64},
        )  # fmt: skip
    if args.epochs:
        base = replace(base, epochs=args.epochs)
    variants = {k: VARIANTS[k] for k in args.variants} | parse_extra(args.extra)
    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for rate in args.rates:
                rows += run_cell(base, dataset, seed, rate, variants, args.out)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    )
    header = f"device: {device or platform.machine()}; torch {torch.__version__}; {date.today()}"
    print(header)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
