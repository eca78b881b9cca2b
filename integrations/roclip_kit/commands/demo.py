"""``roclip demo``: the README's main job, on real images through the real adapters.

The ``roclip`` command mounts this with :func:`add_demo_command`; ``run_demo_command`` prints
progress and a rich table of both runs, and writes ``results.json`` and a plot. See
docs/demo.md for what the figures mean and what they do not show.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from roclip_kit.commands.console import captions_text, percent, progress_bars
from roclip_kit.demo.run import run_demo
from roclip_kit.demo.settings import (
    DATASETS,
    PLOT_FILE,
    RESULTS_FILE,
    SCALES,
    TRAINERS,
    TRIGGER_KINDS,
    DemoSettings,
    defense_verb,
    scale_text,
    scaled_flags,
)
from roclip_plugin.config import RoClipConfig, add_argparse_args, config_from_namespace
from roclip_plugin.config_aliases import saved_defended_epochs
from roclip_plugin.matching import check_matcher_settings
from roclip_plugin.validation import path_arg

TRIGGERS = TRIGGER_KINDS


def add_demo_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command to ``subparsers`` (from ``add_subparsers``).

    Every size's help is read from the scale tables (:func:`roclip_kit.demo.scale_text`), so
    the defaults it shows are those that run.
    """
    parser = subparsers.add_parser(
        "demo",
        help="Poison captioned MNIST, train CLIP and RoCLIP, compare them.",
        description="Builds captioned MNIST (60,000 training images), injects targeted "
        "poisoning and a backdoor at the paper's rates, trains a small CLIP (OpenCLIP's own "
        "model) with and without RoCLIP on the tensor-resident path (the generic-loop "
        "adapter), and evaluates both after every epoch (clean zero-shot, linear probe, "
        "attack success, matching purity, poison detection). The cpu scale finishes in under "
        "10 minutes on two cores. --trainer openclip trains through roclip-openclip-train "
        "instead, at a smaller size. A rerun replaces the results; if it fails, the previous "
        "ones are put back. See docs/demo.md.",
    )
    parser.add_argument(
        "--out",
        type=path_arg,
        default=Path("roclip-demo"),
        help="output folder (default: %(default)s)",
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default="mnist", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--scale", choices=sorted(SCALES), default="cpu", help="sizes preset (default: %(default)s)"
    )
    parser.add_argument(
        "--trainer",
        choices=TRAINERS,
        default="tensor",
        help="tensor: the tensor-resident path through roclip_torch (default); openclip: "
        "OpenCLIP's training script through roclip-openclip-train (its own, smaller sizes)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs trained at once, each with its share of the CPU threads (tensor trainer; "
        f"default: {scale_text('jobs')})",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="data, attack and training seed (default: %(default)s)"
    )
    sizes = parser.add_argument_group("sizes (default: the scale's)")
    for flag, key, text, kind in (
        ("--train-limit", "train_limit", "training images", int),
        ("--test-limit", "test_limit", "test images", int),
        (
            "--attribute-rate",
            "attribute_rate",
            "share of images with rendered colour/size/place",
            float,
        ),
        ("--epochs", "epochs", "epochs", int),
        ("--batch-size", "batch_size", "batch size", int),
        ("--lr", "lr", "learning rate", float),
        ("--model", "model", "model preset of the trainer", str),
        ("--eval-limit", "eval_limit", "test images per epoch's evaluation", int),
    ):
        sizes.add_argument(flag, type=kind, help=f"{text} ({scale_text(key)})")
    attack = parser.add_argument_group("attacks (default: the scale's)")
    attack.add_argument("--targets", type=int, help=f"targeted images ({scale_text('targets')})")
    attack.add_argument(
        "--captions-per-target",
        type=_counts,
        metavar="N[,M...]",
        help="poison captions each; several counts split the targets into equal groups "
        f"({scale_text('captions_per_target')})",
    )
    attack.add_argument(
        "--backdoor-rate",
        type=float,
        help=f"share of training images, 0 for none ({scale_text('backdoor_rate')})",
    )
    attack.add_argument("--backdoor-class", help="backdoor target class (default: by seed)")
    attack.add_argument(
        "--trigger", choices=TRIGGERS, help=f"backdoor trigger ({scale_text('trigger')})"
    )
    group = parser.add_argument_group(
        "RoCLIP options (the RoCLIP run; pool size, schedule and image augmentation default "
        "to the scale's; with --roclip-preset reference only pool size and augmentation)"
    )
    base = RoClipConfig()
    add_argparse_args(
        group,
        default_text={
            key: f"the scale's: {scale_text(key, getattr(base, key))}" for key in scaled_flags(None)
        },
    )
    parser.set_defaults(run=run_demo_command)
    return parser


def _counts(text: str) -> int | list[int]:
    """``25`` -> 25; ``10,50`` -> [10, 50]."""
    try:
        counts = [int(part) for part in text.split(",")]  # "10,,50" is an error, not 10,50
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count or counts separated by commas, got {text!r}"
        ) from None
    if not counts:
        raise argparse.ArgumentTypeError(f"expected a count, got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The demo's settings; only RoCLIP flags given on the command line override the scale's."""
    config = config_from_namespace(args)  # validates every --roclip-* value
    check_matcher_settings(config)
    # Flags not given leave no attribute (argparse.SUPPRESS): only given ones override.
    given = {
        name: getattr(config, name) for name in config.to_dict() if hasattr(args, f"roclip_{name}")
    }
    if getattr(args, "roclip_preset", None) not in (None, "default"):
        given["preset"] = args.roclip_preset
    settings = DemoSettings(
        out=args.out,
        dataset=args.dataset,
        scale=args.scale,
        trainer=args.trainer,
        device=args.device,
        seed=args.seed,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        attribute_rate=args.attribute_rate,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        model=args.model,
        targets=args.targets,
        captions_per_target=args.captions_per_target,
        backdoor_rate=args.backdoor_rate,
        backdoor_class=args.backdoor_class,
        trigger=args.trigger,
        eval_limit=args.eval_limit,
        jobs=args.jobs,
        roclip_flags=given,
    )
    return settings.check()  # every flag, before anything is written


def run_demo_command(args: argparse.Namespace, console: Console) -> int:
    """Run the demo with a progress display; print the comparison table."""
    settings = settings_from_args(args)
    with progress_bars(console, elapsed=True) as progress:
        results = run_demo(settings, say=console.print, progress=progress)
    console.print(results_table(results))
    for note in results.get("verdicts", []):
        console.print(f"- {note}")
    out = Path(settings.out)
    plot = out / PLOT_FILE
    drawn = f"plot: {plot}" if plot.is_file() else "plot: not drawn (pip install matplotlib)"
    console.print(f"results: {out / RESULTS_FILE}   {drawn}")
    return 0


def results_table(results: dict[str, Any]) -> Table:
    """One row per run: clean accuracy, attack success, detection, time (fits 80 columns)."""
    data = results["dataset"]
    poison = results["poison"]
    runs = [r for r in results["runs"] if r["roclip"]]  # older results.json: matching_epochs
    defended = next((saved_defended_epochs(r, []) for r in runs), [])
    verb = defense_verb((results.get("settings") or {}).get("roclip_flags"))
    captions = captions_text(poison["captions_per_target"])
    table = Table(
        title=f"{data['name']}: {data['train']} training images, {poison['poisoned_rows']} "
        f"poisoned ({poison['targets']} targets x {captions} captions, "
        f"backdoor on {100 * poison['backdoor_rate']:.2f}%)",
        caption=f"RoCLIP {verb} in epochs "
        f"{', '.join(map(str, defended)) or 'none'} (1-based). "
        "ASR: attack success rate. purity: matched captions of the image's class. detect: "
        "precision / recall of the most suspicious rows. s: training seconds."
        + _group_caption(results["runs"]),
        box=box.SIMPLE_HEAD,  # no vertical rules and one space between columns: fits 80
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    columns = (
        "run",
        "zero-shot",
        "probe",
        "targeted",
        "backdoor",
        "purity",
        "detect P/R",
        "s",
    )
    table.add_column("run", justify="left")  # the one column that wraps when 80 is tight
    for column in columns[1:]:
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    for run in results["runs"]:
        s = run["summary"]
        detect = "-"
        if s["detection_precision"] is not None:
            precision, recall = s["detection_precision"], s["detection_recall"]
            detect = f"{100 * precision:.1f}/{100 * recall:.1f}%"
        table.add_row(
            run["name"],
            percent(s["zero_shot"]),
            percent(s["linear_probe"]),
            percent(s["targeted_asr"]),
            percent(s["backdoor_asr"]),
            percent(s.get("purity")),
            detect,
            f"{run['train_seconds']:.0f}",
        )
    return table


def _group_caption(runs: list[dict[str, Any]]) -> str:
    """`` Targeted ASR by captions per target: CLIP 10: 100.0%, 50: 100.0%; ...`` or nothing."""
    parts = []
    for run in runs:
        groups = run["summary"].get("targeted_by_captions") or {}
        if len(groups) > 1:
            cells = ", ".join(f"{n}: {percent(rate)}" for n, rate in groups.items())
            parts.append(f"{run['name']} {cells}")
    return " Targeted ASR by captions per target: " + "; ".join(parts) + "." if parts else ""
