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
    python benchmarks/bench_scan.py --datasets fashion-mnist --rates 0.001 --retrain --out sr

Scan, filter, retrain (``--retrain``, issue 23's benchmark row): the workflow a user without
RoCLIP follows. Plain CLIP is trained on the poisoned data as the robustness benchmark's
``clip`` variant (``bench_robustness.spec_for`` and ``run_specs``: evaluated after every epoch
and in full after the last), the scan ranks every pair by ``combined``, the top
``--drop-fraction`` are dropped as ``roclip scan --drop-fraction`` drops them
(``write_filtered_csv``), and plain CLIP is trained again, same recipe and seed, on the kept
rows: the ``scan-filter`` variant. Each run's row (``bench_robustness.row_of``, plus the
filter's figures for ``scan-filter``: ``drop_fraction``, ``dropped_poison``, ``dropped_clean``,
...) is written to ``--runs-dir`` (default ``--out/runs``) under the name the robustness
benchmark gives its runs, so ``bench_robustness.py --out DIR --report`` tables it beside
``clip``, ``robust`` and ``floor`` when ``--runs-dir`` is ``DIR/runs`` (same data: same
dataset, seed, rate and the default scale). ``--floor`` also trains ``clip-clean`` (the same
recipe on the clean rows only: the floor of the goals and the clean zero-shot to stay within a
point of), unless the runs folder holds it already.

Why 10% by default: a user picks the fraction without knowing the poison count. The attacks
measured here put 1.6% to 2.6% of the pairs in poison (960 targeted rows, a backdoor of 0.05%
to 1%), and attack success needs only a few of a target's captions, or a dozen of a
trigger's copies, to stay (30 backdoored rows gave plain CLIP 35-71% on Fashion-MNIST, 12 left
by a filter 18%). With
the group scores' ``combined``, a drop of 5% still kept 34-54 of a 1% backdoor's 600 rows on
Fashion-MNIST, a drop of 10% 3-12 (docs/scan.md, with what plain CLIP retrained on the rest
reached). Dropping 10% is about 6,000 of 61,000 mostly clean pairs, a price a CLIP run on
abundant data can pay. The output also gives the poison recall at 1%, 2%, 5% and 10% of the
pairs, for choosing another.
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
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from roclip_kit.data.tensors import load_poisoned
from roclip_kit.demo.run import build_data, poison
from roclip_kit.demo.runs import run_specs
from roclip_kit.demo.settings import DemoSettings
from roclip_kit.evaluate.scan import (
    detection_report,
    drop_size,
    poisoned_by_attack,
    ranked_rows,
    read_pairs,
    scan_pairs,
    use_threads,
    write_filtered_csv,
)
from roclip_kit.files import read_manifest, read_rows
from roclip_kit.train.loaded import LoadedModel
from roclip_kit.train.models import load_openclip
from roclip_kit.train.tensor import loaded_model, train_tensor

from roclip_plugin.scan import DETECTORS, ScanSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_robustness as br  # noqa: E402  (beside this script: its runs, rows and table)

RETRAIN = "scan-filter"
DROP_FRACTION = 0.1  # the module's docstring says why
RECALL_FRACTIONS = (0.01, 0.02, 0.05, 0.1)
# the clip variant's recipe (plain CLIP, no augmentation) under the filter's name
VARIANTS = {**br.VARIANTS, RETRAIN: br.VARIANTS["clip"]}


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
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="after the scan, drop the top --drop-fraction by combined and retrain plain CLIP "
        "on the kept rows (the scan-filter row)",
    )
    parser.add_argument(
        "--drop-fraction",
        type=float,
        default=DROP_FRACTION,
        help=f"share of the pairs --retrain drops (default {DROP_FRACTION})",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="with --retrain, also train clip-clean (plain CLIP on the clean rows only)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        help="with --retrain, where the runs' rows go (default: --out/runs; a robustness "
        "benchmark's OUT/runs puts them in its --report)",
    )
    args = parser.parse_args(argv)
    if not 0.0 < args.drop_fraction < 1.0:
        parser.error(f"--drop-fraction must be above 0 and below 1, got {args.drop_fraction}")
    if args.floor and not args.retrain:
        parser.error("--floor goes with --retrain")
    if args.runs_dir is None:
        args.runs_dir = args.out / "runs"
    return args


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
    """Poison, train (or load), scan and judge one cell; its figures as a dict.

    With ``--retrain``, the model scanned is the ``clip`` run (its row saved), and the cell
    then filters and retrains (:func:`retrain`).
    """
    s = settings_for(args, dataset, rate)
    key = f"{s.dataset}-s{s.seed}-r{rate:g}"
    folder = args.out / key
    data = build_data(s, args.out / "data" / f"{s.dataset}-s{s.seed}", say=_log)
    poisoned = poison(s, data, folder / "poisoned", say=_log)
    cell = br.Cell(s.dataset, s.seed, rate)
    rows: list[dict[str, Any]] = []
    if args.retrain and args.checkpoint is None:
        loaded, train_seconds = clip_run(args, s, cell, poisoned, folder, rows)
    else:
        loaded, train_seconds = model_for(args, s, poisoned.out_dir, folder)
    pairs = read_pairs(poisoned.csv)
    embeddings = folder / "embeddings"
    shutil.rmtree(embeddings, ignore_errors=True)  # a benchmark times a whole scan
    settings = ScanSettings(k=args.k, reference_size=args.reference_size or None, seed=s.seed)
    result = scan_pairs(loaded, pairs, embeddings, settings, batch_size=args.batch_size)
    masks = poisoned_by_attack(poisoned.manifest_path, pairs)
    detection = detection_report(result.scores, masks)
    out = {
        "cell": key,
        "pairs": len(pairs),
        "poisoned": {g: detection["combined"][g]["k"] for g in detection["combined"]},
        "train_seconds": train_seconds,
        "embed_seconds": result.embed_seconds,
        "score_seconds": result.score_seconds,
        "pairs_per_second": result.pairs_per_second,
        "detection": detection,
    }
    if args.retrain:
        out["retrain"] = retrain(args, s, cell, poisoned, result.scores, masks, folder, rows)
    return out


def run_row(
    args: argparse.Namespace, s: DemoSettings, cell: Any, name: str, dataset: Any
) -> dict[str, Any]:
    """Train and evaluate one variant as the robustness benchmark does; its result.

    ``dataset`` has the ``out_dir`` and ``manifest_path`` of a poisoned dataset directory.
    """
    spec = br.spec_for(cell, name, s, dataset, VARIANTS, args.out, 1)
    if name == RETRAIN:  # a stopped run resumes only on the data of its own filter
        spec = replace(spec, run_dir=spec.run_dir.with_name(f"{name}-{args.drop_fraction:g}"))
    _log(f"{cell.key}: training {name} ({s.epochs} epochs)")
    (result,) = run_specs([spec], 1)
    return result


def save_row(args: argparse.Namespace, cell: Any, row: dict[str, Any]) -> Path:
    """A run's row in ``--runs-dir``, named as the robustness benchmark names its runs."""
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    path = args.runs_dir / f"{cell.key}-{row['variant']}.json"
    path.write_text(json.dumps(row, indent=1))
    _log(f"{row['variant']}: row saved as {path}")
    return path


def clip_run(
    args: argparse.Namespace,
    s: DemoSettings,
    cell: Any,
    poisoned: Any,
    folder: Path,
    rows: list[dict[str, Any]],
) -> tuple[LoadedModel, float]:
    """The ``clip`` run on the poisoned data: its row saved, its model (clip.pt) to scan."""
    result = run_row(args, s, cell, "clip", poisoned)
    row = br.row_of(result)
    save_row(args, cell, row)
    rows.append(row)
    path = Path(shutil.copyfile(result["checkpoint"], folder / "clip.pt"))
    return load_openclip(path, "(kit checkpoint)", args.device), result["train_seconds"]


def drop_figures(
    scores: dict[str, np.ndarray], masks: dict[str, np.ndarray], fraction: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows the filter drops (top ``fraction`` by combined) and what they hit.

    ``dropped_poison`` + ``kept_poison`` is the manifest's row count; the recall of the drop
    is against it. ``recall_at`` is the poison recall at other fractions, from the same ranking.
    """
    ranked = ranked_rows(scores, "combined")
    poisoned = np.logical_or.reduce(list(masks.values()))
    total = int(poisoned.sum())
    drop = ranked[: drop_size(len(ranked), fraction, None)]
    hit = int(poisoned[drop].sum())
    recall_at = {
        f"{f:g}": int(poisoned[ranked[: drop_size(len(ranked), f, None)]].sum()) / max(total, 1)
        for f in sorted({*RECALL_FRACTIONS, fraction})
    }
    return drop, {
        "drop_fraction": fraction,
        "drop_by": "combined",
        "dropped_rows": len(drop),
        "dropped_poison": hit,
        "dropped_clean": len(drop) - hit,
        "kept_poison": total - hit,
        "poisoned_rows": total,
        **{f"dropped_{g}": int(m[drop].sum()) for g, m in masks.items()},
        "drop_recall": hit / total if total else None,
        "drop_precision": hit / len(drop) if len(drop) else None,
        "recall_at": recall_at,
    }


def filtered_dataset(poisoned: Any, drop: np.ndarray, folder: Path) -> SimpleNamespace:
    """A copy of the poisoned dataset directory without the dropped training rows.

    ``train.csv`` is what ``roclip scan --drop-fraction`` writes; ``test.csv`` and
    ``classes.json`` are copied; the manifest keeps the targets and the trigger (what attack
    success is measured with) and lists the poisoned rows still there, renumbered, so the
    evaluation leaves them out of the linear probe as it does on the full data. Its source CSV
    is cut the same way: backdoors change rows in place and targeted rows are appended, so the
    source's row ``r`` is the poisoned CSV's row ``r``, and a kept backdoored row still finds
    its image's class there.
    """
    folder.mkdir(parents=True, exist_ok=True)
    train = write_filtered_csv(poisoned.csv, folder / "train.csv", drop)
    for name in ("test.csv", "classes.json"):
        shutil.copyfile(poisoned.out_dir / name, folder / name)
    manifest = dict(read_manifest(poisoned.manifest_path).data)  # a copy to amend and write
    dropped = np.zeros(len(read_rows(poisoned.csv)), dtype=bool)
    dropped[drop] = True
    renumbered = np.cumsum(~dropped) - 1  # old row -> its row in the filtered CSV
    manifest["rows"] = [
        {**e, "row": int(renumbered[e["row"]])} for e in manifest["rows"] if not dropped[e["row"]]
    ]
    source = manifest.get("source_csv")
    if source and Path(source).is_file():
        n = len(read_rows(Path(source)))
        cut = write_filtered_csv(Path(source), folder / "source.csv", drop[drop < n])
        manifest["source_csv"] = str(cut.resolve())
    manifest["poisoned_csv"] = str(train.resolve())
    manifest["filtered_from"] = str(poisoned.manifest_path)
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return SimpleNamespace(out_dir=folder.resolve(), manifest_path=path.resolve())


def retrain(
    args: argparse.Namespace,
    s: DemoSettings,
    cell: Any,
    poisoned: Any,
    scores: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    folder: Path,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Drop the top rows, retrain plain CLIP on the rest (``scan-filter``), save its row.

    With ``--floor``, ``clip-clean`` too (kept from ``--runs-dir`` where it is there).
    Returns the filter's figures and every row of the cell (``clip`` first, when trained).
    """
    drop, figures = drop_figures(scores, masks, args.drop_fraction)
    _log(
        f"{cell.key}: dropping {figures['dropped_rows']} rows, {figures['dropped_poison']} of "
        f"the {figures['poisoned_rows']} poisoned"
    )
    kept = filtered_dataset(poisoned, drop, folder / "filtered")
    row = br.row_of(run_row(args, s, cell, RETRAIN, kept)) | figures
    save_row(args, cell, row)
    rows.append(row)
    if args.floor:
        saved = args.runs_dir / f"{cell.key}-clip-clean.json"
        if saved.is_file():
            _log(f"clip-clean: kept the row in {saved}")
            rows.append(json.loads(saved.read_text()))
        else:
            floor = br.row_of(run_row(args, s, cell, "clip-clean", poisoned))
            save_row(args, cell, floor)
            rows.append(floor)
    return {**figures, "rows": rows}


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


def retrain_text(cells: list[dict[str, Any]]) -> str:
    """What each cell's filter dropped, and the robustness benchmark's table of its runs."""
    lines = ["Scan, filter, retrain:", ""]
    for c in cells:
        r = c["retrain"]
        by_attack = ", ".join(
            f"{r[f'dropped_{g}']} {g}" for g in ("backdoor", "targeted") if f"dropped_{g}" in r
        )
        recall = ", ".join(f"{100 * float(f):g}%: {v:.3f}" for f, v in r["recall_at"].items())
        lines.append(
            f"{c['cell']}: dropped the top {100 * r['drop_fraction']:g}% by {r['drop_by']} "
            f"({r['dropped_rows']} rows): {r['dropped_poison']} of {r['poisoned_rows']} poisoned "
            f"({by_attack}; recall {r['drop_recall']:.3f}) and {r['dropped_clean']} clean; "
            f"{r['kept_poison']} poisoned rows kept. Poison recall by share dropped: {recall}"
        )
    lines += ["", br.table([row for c in cells for row in c["retrain"]["rows"]])]
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
    if args.retrain:
        text += "\n\n" + retrain_text(cells)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"header": header, "cells": cells}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
