r"""Clean zero-shot between epoch ends: runs of the robustness benchmark traced step by step.

``bench_robustness.py`` reads clean zero-shot once an epoch, so a run whose accuracy swings
within an epoch shows a fall only where an epoch happens to end inside a dip. This trains runs
of one cell exactly as the grid does (the same poisoned data, variant, settings and threads:
a variant's run equals the grid's run of that cell bit for bit), keeps the weights
every ``--every`` optimiser steps, and reads zero-shot of each on the first ``--test-limit``
test images, per class too: how deep and how often zero-shot dips between epoch ends, and which
classes go. ``--grad-clip-norm`` trains the same runs with OpenCLIP's gradient clipping,
``--clean`` on the clean rows only (the poisoned ones removed, as the grid's floors train).

It prints, per run, the worst dip after ``--after-epoch`` (a reading's fall below the best of
the ``--window`` readings before it), how many dips pass 10 and 20 points, the classes that
lose most in the worst one, the largest fall between epoch ends (the grid's own reading) and
the final figures. Runs and readings are kept under ``--out/steps/<cell>/<run>/`` as they
finish (``trace.json``, ``run.json``), so a stopped trace resumes; nothing is asserted.

    python benchmarks/bench_steps.py --out robustness --dataset mnist --seed 1 --rate 0.01 \\
        --variants clip robust floor clip-clean
    python benchmarks/bench_steps.py --out robustness ... --variants robust --grad-clip-norm 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import bench_robustness as br
import numpy as np
import torch

WEIGHTS = "weights"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("robustness"), help="the grid's folder")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.01, help="backdoor rate of the cell")
    parser.add_argument("--variants", nargs="+", default=["clip", "robust"])
    parser.add_argument("--every", type=int, default=10, help="optimiser steps between readings")
    parser.add_argument("--test-limit", type=int, default=2000, help="test images per reading")
    parser.add_argument("--grad-clip-norm", type=float, help="clip the gradient norm to this")
    parser.add_argument("--after-epoch", type=int, default=3, help="dips counted after it")
    parser.add_argument("--window", type=int, default=5, help="readings a dip is measured from")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (1 thread each on 2)")
    parser.add_argument("--quick", action="store_true", help="the grid's toy cell: a check")
    parser.add_argument("--clean", action="store_true", help="train on the clean rows only")
    args = parser.parse_args(argv)
    for name in ("every", "test_limit", "window", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give 1 or more")
    if args.grad_clip_norm is not None and not args.grad_clip_norm > 0:
        parser.error(f"--grad-clip-norm {args.grad_clip_norm}: give a number > 0")
    unknown = [v for v in args.variants if v not in br.VARIANTS]
    if unknown:
        parser.error(f"--variants {' '.join(unknown)}: not one of {', '.join(br.VARIANTS)}")
    return args


def run_name(variant: str, clip: float | None, clean: bool = False) -> str:
    """The trace's folder name: the variant, the clipping where there is one, clean rows."""
    return variant + ("" if clip is None else f"-gc{clip:g}") + ("-clean" if clean else "")


class WeightSaver:
    """``on_weights`` of the kit's trainer: the weights every ``every`` steps, to disk.

    A class (not a closure), so that it travels to a worker process.
    """

    def __init__(self, folder: Path, every: int) -> None:
        self.folder, self.every = folder, every

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        """Save the weights where ``step`` (the run's steps done) is a multiple of ``every``."""
        if step % self.every == 0:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save(state, self.folder / f"w_{step:06d}.pt")


def _cell_spec(args: argparse.Namespace, variant: str) -> tuple[Any, Any]:
    """The cell's poisoned data (the grid's, shared) and the run's spec, under ``--out/steps``."""
    grid = br.parse_args(
        ["--out", str(args.out), "--jobs", str(args.jobs)] + ["--quick"] * args.quick
    )
    base = br.base_settings(grid)  # --quick: the toy cell (digits, seed 0, rate 0.05)
    if args.quick:
        args.dataset, args.seed, args.rate = grid.datasets[0], grid.seeds[0], grid.rates[0]
    cell = br.Cell(args.dataset, args.seed, args.rate)
    s, poisoned = br.prepare(cell, base, args.out)
    clip = args.grad_clip_norm
    spec = br.spec_for(cell, variant, s, poisoned, br.VARIANTS, args.out, args.jobs, clip)
    run_dir = args.out / "steps" / cell.key / run_name(variant, clip, args.clean)
    clean = spec.clean_only or args.clean  # a floor variant trains on the clean rows anyway
    return poisoned, replace(spec, run_dir=run_dir, clean_only=clean)


def train_traced(args: argparse.Namespace, variant: str) -> Path:
    """Train one run as the grid does, its weights every ``--every`` steps; its folder."""
    from roclip_kit.demo.runs import run_spec

    _, spec = _cell_spec(args, variant)
    done = spec.run_dir / "run.json"
    if done.is_file():
        return spec.run_dir
    (spec.run_dir / WEIGHTS).mkdir(parents=True, exist_ok=True)
    result = run_spec(spec, on_weights=WeightSaver(spec.run_dir / WEIGHTS, args.every))
    result["steps_per_epoch"] = len(_train_rows(spec)) // spec.train.batch_size
    done.write_text(json.dumps(result, default=str))
    return spec.run_dir


def _train_rows(spec: Any) -> Any:
    from roclip_kit.data.tensors import load_poisoned

    data = load_poisoned(spec.dataset_dir, spec.manifest)
    return (data.without_poison() if spec.clean_only else data).train


def read_trace(run_dir: Path, poisoned: Any, test_limit: int) -> dict[int, dict[str, Any]]:
    """Zero-shot (overall and per class) of every saved weight file, kept in trace.json."""
    from roclip_kit.evaluate.features import class_embeddings, encode_images
    from roclip_kit.evaluate.metrics import zero_shot_predict
    from roclip_kit.files import read_classes, read_split
    from roclip_kit.train.models import load_tensor_checkpoint, read_tensor_checkpoint

    path = run_dir / "trace.json"
    trace = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
    final = Path(json.loads((run_dir / "run.json").read_text())["checkpoint"])
    saved = read_tensor_checkpoint(final)
    classes = read_classes(poisoned.out_dir / "classes.json")
    test = read_split(poisoned.out_dir / "test.csv", classes)
    files, labels = test.filepaths[:test_limit], np.asarray(test.labels[:test_limit])
    for weights in sorted((run_dir / WEIGHTS).glob("w_*.pt")):
        step = int(weights.stem[2:])
        if step in trace:
            continue
        model = load_tensor_checkpoint(final, {**saved, "state_dict": torch.load(weights)})
        found = zero_shot_predict(
            encode_images(model, files, batch_size=500), class_embeddings(model, classes)
        )
        # a class without test images among the first test_limit reads NaN, never a dip
        per_class = [
            float((found[labels == c] == c).mean()) if (labels == c).any() else float("nan")
            for c in range(len(classes.names))
        ]
        trace[step] = {"accuracy": float((found == labels).mean()), "per_class": per_class}
        path.write_text(json.dumps(trace))
    return dict(sorted(trace.items()))


def dips(trace: dict[int, dict[str, Any]], start_step: int, window: int) -> list[tuple[int, float]]:
    """``(step, fall)`` of each reading after ``start_step``, in points.

    A reading's fall is how far it lies below the best of the ``window`` readings before it
    (0 where it is not below): a dip shows at its bottom, however many readings it lasts.
    """
    steps = sorted(trace)
    accuracy = np.array([trace[s]["accuracy"] for s in steps]) * 100
    found = []
    for i, step in enumerate(steps):
        if step <= start_step or i == 0:
            continue
        best = accuracy[max(0, i - window) : i].max()
        found.append((step, float(max(0.0, best - accuracy[i]))))
    return found


def summarize(
    trace: dict[int, dict[str, Any]], steps_per_epoch: int, after_epoch: int, window: int
) -> dict[str, Any]:
    """The dips of a trace after ``after_epoch`` epochs, and the classes of the worst."""
    found = dips(trace, after_epoch * steps_per_epoch, window)
    if not found:
        return {"readings": 0}
    step, worst = max(found, key=lambda d: d[1])
    steps = sorted(trace)
    i = steps.index(step)
    earlier = np.array([trace[s]["per_class"] for s in steps[max(0, i - window) : i]], dtype=float)
    lost = np.nan_to_num(earlier.max(axis=0) - np.array(trace[step]["per_class"], dtype=float))
    return {
        "readings": len(found),
        "worst": worst,
        "worst_step": step,
        "over_10": sum(fall > 10 for _, fall in found),
        "over_20": sum(fall > 20 for _, fall in found),
        "lowest": min(trace[s]["accuracy"] for s, _ in found) * 100,
        "classes_lost": [(int(c), float(lost[c] * 100)) for c in np.argsort(-lost)[:3]],
    }


def epoch_fall(per_epoch: dict[str, Any]) -> float:
    """The largest fall of zero-shot from one epoch end to the next, in points."""
    values = [per_epoch[k]["zero_shot"] for k in sorted(per_epoch, key=int)]
    return max([0.0, *(100 * (a - b) for a, b in zip(values, values[1:], strict=False))])


def line(name: str, summary: dict[str, Any], result: dict[str, Any], classes: list[str]) -> str:
    """One row of the printed table."""
    final = result["final"]
    attack = {k: (final.get(k) or {}).get("success_rate") for k in ("targeted", "backdoor")}
    if not summary["readings"]:
        dip = ["-", "-", "-", "-"]
    else:
        lost = ", ".join(f"{classes[c]} -{p:.0f}" for c, p in summary["classes_lost"])
        dip = [
            f"{summary['worst']:.1f} (step {summary['worst_step']})",
            f"{summary['over_10']} / {summary['over_20']} of {summary['readings']}",
            f"{summary['lowest']:.1f}",
            lost,
        ]
    figures = [epoch_fall(result["per_epoch"]), final["zero_shot"]["accuracy"] * 100]
    figures += [None if v is None else 100 * v for v in attack.values()]
    cells = [name, *dip, *("-" if v is None else f"{v:.1f}" for v in figures)]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jobs == 1:
        folders = [train_traced(args, variant) for variant in args.variants]
    else:  # a process a run, as the grid runs them (each sets its own thread count)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            folders = list(pool.map(train_traced, [args] * len(args.variants), args.variants))
    from roclip_kit.files import read_classes

    poisoned, _ = _cell_spec(args, args.variants[0])
    names = read_classes(poisoned.out_dir / "classes.json").names
    print(
        f"{args.dataset} seed {args.seed}, backdoor {args.rate:g}: zero-shot every "
        f"{args.every} steps on the first {args.test_limit} test images, dips after epoch "
        f"{args.after_epoch} (below the best of the {args.window} readings before)\n"
    )
    print(
        "| run | worst dip | dips > 10 / > 20 points | lowest | classes lost most "
        "| worst fall between epoch ends | zero-shot | targeted | backdoor |"
    )
    print("|" + " --- |" * 9)
    for variant, folder in zip(args.variants, folders, strict=True):
        result = json.loads((folder / "run.json").read_text())
        trace = read_trace(folder, poisoned, args.test_limit)
        summary = summarize(trace, result["steps_per_epoch"], args.after_epoch, args.window)
        print(line(run_name(variant, args.grad_clip_norm, args.clean), summary, result, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
