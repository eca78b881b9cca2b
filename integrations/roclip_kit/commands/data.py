"""``roclip data`` (build a captioned dataset) and ``roclip poison`` (attack a dataset).

The ``roclip`` command mounts these with :func:`add_data_command` and
:func:`add_poison_command`; each sub-command's ``run`` default takes the parsed arguments and a
rich console and returns an exit code, raising ``ValueError`` with the fix for bad input (the
caller prints it and exits 2). See docs/attacks.md.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from roclip_kit.attack.poison import DEFAULT_CAPTIONS_PER_TARGET, PoisonResult, poison_dataset
from roclip_kit.attack.tables import Columns
from roclip_kit.attack.triggers import PARAMS, PATCH_POSITIONS, TRIGGERS, make_trigger
from roclip_kit.commands.console import captions_text, progress_bars
from roclip_kit.data.datasets import SOURCES, DatasetInfo, build_captioned_dataset
from roclip_kit.files import CAPTION_KEY, CSV_SEPARATOR, IMAGE_KEY, LABEL_KEY
from roclip_plugin.validation import path_arg

# Trigger flag (argparse dest) -> (trigger kind, parameter name).
TRIGGER_FLAGS: dict[str, tuple[str, str]] = {
    "patch_size": ("patch", "size"),
    "patch_position": ("patch", "position"),
    "blend_alpha": ("blend", "alpha"),
    "wanet_k": ("wanet", "k"),
    "wanet_strength": ("wanet", "strength"),
}


# ---------------------------------------------------------------- roclip data


def add_data_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``data`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "data",
        help="Build a captioned image dataset (MNIST, Fashion-MNIST, digits) offline.",
        description="Render a real dataset with coloured, placed and sized objects and "
        "captions that name them, as train.csv/test.csv (OpenCLIP CSV format), classes.json "
        "and PNG images. A complete earlier build with the same options is reused.",
    )
    parser.add_argument(
        "--dataset", choices=SOURCES, default="mnist", help="source (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=path_arg, required=True, metavar="DIR", help="output directory"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="attributes and subsets (default: %(default)s)"
    )
    parser.add_argument(
        "--train-limit", type=int, metavar="N", help="class-balanced subset of N training images"
    )
    parser.add_argument("--test-limit", type=int, metavar="N", help="the same for the test split")
    parser.add_argument(
        "--image-size",
        type=int,
        default=32,
        metavar="PX",
        help="image side (default: %(default)s)",
    )
    parser.add_argument(
        "--attribute-rate",
        type=float,
        default=1.0,
        metavar="R",
        help="share of images rendered with a colour, size and place their caption names; the "
        "rest are plain white-on-black with plain captions (default: %(default)s)",
    )
    parser.set_defaults(run=run_data)
    return parser


def run_data(args: argparse.Namespace, console: Console) -> int:
    """Build the dataset and print where it lies."""
    with progress_bars(console) as progress:
        info = build_captioned_dataset(
            args.dataset,
            args.out,
            seed=args.seed,
            train_limit=args.train_limit,
            test_limit=args.test_limit,
            image_size=args.image_size,
            attribute_rate=args.attribute_rate,
            progress=progress,
        )
    console.print(data_table(info))
    return 0


def data_table(info: DatasetInfo) -> Table:
    """A short summary of a built dataset."""
    verb = "reused" if info.reused else f"built in {info.seconds:.1f} s"
    table = Table(title=f"{info.name}: {verb}", show_header=False)
    table.add_row("directory", str(info.root))
    table.add_row("train / test", f"{info.train_count} / {info.test_count} images")
    table.add_row("image size", f"{info.image_size} px")
    table.add_row("classes", ", ".join(info.classes))
    table.add_row(
        "OpenCLIP",
        f"--train-data {info.train_csv} --csv-img-key {IMAGE_KEY} --csv-caption-key {CAPTION_KEY}",
    )
    return table


# ---------------------------------------------------------------- roclip poison


def add_poison_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``poison`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "poison",
        help="Write a poisoned copy of a CSV dataset (targeted poisoning and/or a backdoor).",
        description="Targeted poisoning pairs held-out target images with captions of another "
        "class; a backdoor stamps a trigger on training images and recaptions them with a "
        "target class. Writes train.csv, manifest.json and the new images into --out. See "
        "docs/attacks.md.",
    )
    _input_arguments(parser)
    _targeted_arguments(parser)
    _backdoor_arguments(parser)
    _trigger_arguments(parser)
    parser.set_defaults(run=run_poison)
    return parser


def _input_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input and output")
    group.add_argument(
        "--dataset", type=path_arg, metavar="DIR", help="captioned dataset directory"
    )
    group.add_argument("--csv", type=path_arg, metavar="FILE", help="training CSV (instead of DIR)")
    group.add_argument("--classes", type=path_arg, metavar="FILE", help="classes.json (with --csv)")
    group.add_argument(
        "--test-csv", type=path_arg, metavar="FILE", help="held-out CSV that targets come from"
    )
    group.add_argument(
        "--out", type=path_arg, required=True, metavar="DIR", help="output directory"
    )
    group.add_argument(
        "--seed", type=int, default=0, help="every random choice (default: %(default)s)"
    )
    group.add_argument("--img-key", default=IMAGE_KEY, help="image column (default: %(default)s)")
    group.add_argument(
        "--caption-key", default=CAPTION_KEY, help="caption column (default: %(default)s)"
    )
    group.add_argument("--label-key", default=LABEL_KEY, help="label column (default: %(default)s)")
    group.add_argument(
        "--separator",
        default=CSV_SEPARATOR,
        type=_separator,
        help="CSV separator, one character; '\\t' and tab spell a tab (default: tab)",
    )


def _targeted_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("targeted poisoning")
    group.add_argument(
        "--targets", type=int, default=0, metavar="N", help="targets (default: %(default)s)"
    )
    group.add_argument(
        "--captions-per-target",
        type=_int_list,
        default=[DEFAULT_CAPTIONS_PER_TARGET],
        metavar="N[,M...]",
        help=f"poisoned pairs per target (default: {DEFAULT_CAPTIONS_PER_TARGET}); several "
        "counts split the targets into equal groups, e.g. --targets 32 --captions-per-target "
        "10,50",
    )
    group.add_argument(
        "--adversarial-class", metavar="NAME", help="class for every target (default: drawn)"
    )
    group.add_argument(
        "--target-rows",
        type=_int_list,
        metavar="I,J,...",
        help="0-based held-out rows to use as targets (default: drawn)",
    )


def _backdoor_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backdoor")
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--backdoor-count", type=int, metavar="N", help="training rows to trigger")
    amount.add_argument(
        "--backdoor-rate", type=float, metavar="R", help="fraction of training rows (0.001 = 0.1%%)"
    )
    group.add_argument("--backdoor-class", metavar="NAME", help="class the trigger should evoke")


def _trigger_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trigger (see docs/attacks.md)")
    group.add_argument(
        "--trigger", choices=tuple(TRIGGERS), default="patch", help="(default: %(default)s)"
    )
    group.add_argument(
        "--patch-size", type=_size, metavar="PX|FRAC", help="pixels (4) or a fraction (0.125)"
    )
    group.add_argument(
        "--patch-position",
        type=_position,
        metavar="WHERE",
        help=f"{', '.join(PATCH_POSITIONS)} or x,y (default: random)",
    )
    group.add_argument("--blend-alpha", type=float, metavar="A", help="noise weight (0.2)")
    group.add_argument("--wanet-k", type=int, metavar="K", help="control points per side (4)")
    group.add_argument("--wanet-strength", type=float, metavar="S", help="warp strength (0.5)")
    group.add_argument("--trigger-seed", type=int, metavar="SEED", help="(default: --seed)")


def _one_or_groups(counts: list[int]) -> int | list[int]:
    """``[100]`` -> 100 (one strength, as manifests always recorded it); else the list."""
    return counts[0] if len(counts) == 1 else counts


def _int_list(text: str) -> list[int]:
    """``3`` or ``1,5,9``; an empty part (``1,,3``: a typo of ``1,2,3``?) is an error."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def _separator(text: str) -> str:
    """A backslash-t or ``tab`` spells a tab; anything else is itself (checked by ``Columns``)."""
    return "\t" if text in ("\\t", "tab") else text


def _size(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pixels or a fraction, got {text!r}") from None


def _position(text: str) -> str | tuple[int, int]:
    if "," not in text:
        return text
    values = _int_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected x,y, got {text!r}")
    return values[0], values[1]


def trigger_from_args(args: argparse.Namespace) -> Any:
    """The trigger the flags describe; flags of another trigger kind are an error."""
    params: dict[str, Any] = {}
    for dest, (kind, name) in TRIGGER_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if kind != args.trigger:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(
                f"{flag} applies to --trigger {kind}, not --trigger {args.trigger} (its "
                f"parameters: {', '.join(PARAMS[args.trigger])})"
            )
        params[name] = value
    flag = "--trigger-seed" if args.trigger_seed is not None else "--seed"
    seed = args.trigger_seed if args.trigger_seed is not None else args.seed
    if seed < 0:
        raise ValueError(f"{flag} must be a non-negative integer, got {seed}")
    return make_trigger(args.trigger, seed=seed, **params)


def _check_backdoor_flags(args: argparse.Namespace) -> bool:
    """Whether a backdoor was asked for; trigger flags without one are an error."""
    wanted = args.backdoor_count is not None or args.backdoor_rate is not None
    set_flags = [d for d in TRIGGER_FLAGS if getattr(args, d, None) is not None]
    if not wanted and (set_flags or args.backdoor_class or args.trigger_seed is not None):
        raise ValueError(
            "backdoor options were given without --backdoor-count N or --backdoor-rate R"
        )
    return wanted


def run_poison(args: argparse.Namespace, console: Console) -> int:
    """Poison the dataset and print what changed."""
    wants_backdoor = _check_backdoor_flags(args)
    columns = Columns(args.img_key, args.caption_key, args.label_key, args.separator)
    with progress_bars(console) as progress:
        result = poison_dataset(
            args.out,
            dataset_dir=args.dataset,
            csv_path=args.csv,
            classes=args.classes,
            test_csv=args.test_csv,
            targets=args.targets,
            captions_per_target=_one_or_groups(args.captions_per_target),
            adversarial_class=args.adversarial_class,
            target_rows=args.target_rows,
            backdoor_count=args.backdoor_count,
            backdoor_rate=args.backdoor_rate,
            backdoor_class=args.backdoor_class,
            trigger=trigger_from_args(args) if wants_backdoor else None,
            seed=args.seed,
            columns=columns,
            progress=progress,
        )
    console.print(poison_table(result))
    for note in result.notes:
        console.print(f"[dim]note: {note}[/dim]", soft_wrap=True)
    return 0


def poison_table(result: PoisonResult) -> Table:
    """A short summary of a poisoning run."""
    manifest = result.manifest
    table = Table(title="poisoned dataset", show_header=False)
    table.add_row("directory", str(result.out_dir))
    table.add_row("train CSV", str(result.csv))
    table.add_row("manifest", str(result.manifest_path))
    targeted = manifest["targeted"]
    if targeted:
        pushed = ", ".join(
            f"{t['id']}->{t['adversarial_class']}" for t in targeted["targets"][:8]
        ) + (" ..." if len(targeted["targets"]) > 8 else "")
        table.add_row(
            "targeted",
            f"{len(targeted['targets'])} targets x "
            f"{captions_text(targeted['captions_per_target'])} captions "
            f"= {len(result.targeted_rows)} rows appended ({pushed})",
        )
    backdoor = manifest["backdoor"]
    if backdoor:
        table.add_row(
            "backdoor",
            f"{backdoor['count']} rows ({backdoor['rate']:.3%}) -> {backdoor['target_class']!r}, "
            f"trigger {backdoor['trigger']}",
        )
    return table
