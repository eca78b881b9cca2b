"""``roclip eval``: score an OpenCLIP checkpoint for clean accuracy, attacks and detection.

The ``roclip`` command mounts this with :func:`add_eval_command`; the sub-command's ``run``
default takes the parsed arguments and a rich console and returns an exit code, raising
``ValueError`` with the fix for bad input (the caller prints it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from roclip_kit.commands.console import percent, progress_bars
from roclip_kit.evaluate.features import ProgressFactory
from roclip_kit.evaluate.metrics import find_suspicious
from roclip_kit.evaluate.run import EvalData, EvalSettings, evaluate_checkpoint
from roclip_kit.files import read_classes
from roclip_kit.train.models import (
    TRAINER_MODEL_HINT,
    check_checkpoint_path,
    check_model_name,
    is_trainer_checkpoint,
    read_tensor_checkpoint,
    run_params,
)
from roclip_plugin.io import atomic_write_text, check_output_file
from roclip_plugin.validation import check_device, path_arg

DEFAULT_PROBE_LIMIT = 5000


def add_eval_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "eval",
        help="Score a checkpoint: zero-shot and linear-probe accuracy, attack success, "
        "poison detection.",
        description="Evaluate an OpenCLIP checkpoint on a captioned dataset directory; with a "
        "poison manifest also attack success and how well RoCLIP's suspicious rows find the "
        "poison. See docs/evaluation.md.",
    )
    add_model_arguments(parser)
    _data_arguments(parser)
    _limit_arguments(parser)
    parser.add_argument("--json", type=path_arg, metavar="OUT", help="also write results as JSON")
    parser.set_defaults(run=run_eval)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--model``, ``--force-quick-gelu``, ``--device``, ``--batch-size``.

    Shared by every command that loads a checkpoint (``eval``, ``scan``), so a model is named
    the same way everywhere; :func:`resolve_model` reads them back.
    """
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint", type=path_arg, required=True, help="OpenCLIP checkpoint (epoch_N.pt)"
    )
    group.add_argument(
        "--model",
        help="OpenCLIP model name or local-dir:<dir> (default: 'model' in the run's "
        "params.txt, two folders above the checkpoint)",
    )
    group.add_argument(
        "--force-quick-gelu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="as in training (default: from the run's params.txt, else off)",
    )
    group.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    group.add_argument(
        "--batch-size", type=int, default=64, help="images per batch (default: %(default)s)"
    )


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset", type=path_arg, metavar="DIR", help="dataset dir (train.csv, test.csv, ...)"
    )
    group.add_argument("--test-csv", type=path_arg, help="test CSV (default: DIR/test.csv)")
    group.add_argument(
        "--train-csv", type=path_arg, help="linear-probe CSV (default: DIR/train.csv)"
    )
    group.add_argument("--classes", type=path_arg, help="classes.json (default: DIR/classes.json)")
    group.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help="zero-shot prompt with {} for the class name; repeat for more (default: the "
        "templates of classes.json)",
    )
    group.add_argument(
        "--manifest", type=path_arg, help="poison manifest JSON (attacks, detection)"
    )
    group.add_argument(
        "--suspicious",
        type=path_arg,
        action="append",
        metavar="CSV",
        help="a suspicious_epoch_N.csv to score against the manifest (repeatable)",
    )
    group.add_argument(
        "--run-dir",
        type=path_arg,
        help="OpenCLIP run folder whose suspicious_epoch_N.csv files to score (default with "
        "--manifest: the checkpoint's folder)",
    )
    group.add_argument(
        "--suspicious-epoch",
        default="latest",
        metavar="N|latest|all",
        help="which epoch's suspicious file of the run folder (default: %(default)s)",
    )


def _limit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to run and how much")
    group.add_argument(
        "--linear-probe",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit a logistic regression on frozen image features (default: when a train CSV "
        "is known)",
    )
    group.add_argument("--test-limit", type=int, help="score a random subset of test images")
    group.add_argument(
        "--backdoor-limit", type=int, help="triggered test images to score (default: all)"
    )
    group.add_argument(
        "--probe-limit",
        type=int,
        default=DEFAULT_PROBE_LIMIT,
        help="linear-probe training images (default: %(default)s)",
    )
    group.add_argument(
        "--probe-c",
        type=float,
        default=1.0,
        help="probe's inverse L2 strength, > 0 (default: %(default)s)",
    )
    group.add_argument(
        "--k", type=int, help="rows for precision/recall (default: the number poisoned)"
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of the random subsets (default: %(default)s)"
    )


# ---------------------------------------------------------------- running


def run_eval(args: argparse.Namespace, console: Console) -> int:
    """Evaluate, print a table, optionally write JSON; bad input raises ``ValueError``.

    Every flag and file is checked before the checkpoint is loaded, so a bad ``--json`` or
    ``--device`` fails in a second, not after the whole evaluation.
    """
    json_path = check_output_file(args.json, "--json")
    check_device(args.device)
    settings = settings_from_args(args)
    check_checkpoint_path(args.checkpoint)
    data = resolve_data(args)
    check_json_is_not_an_input(json_path, args.checkpoint, data)
    read_classes(data.classes, settings.templates)  # readable, no class twice, templates
    model, quick_gelu = resolve_model(args)
    console.print(f"Evaluating [bold]{args.checkpoint}[/bold] (model {model})")
    try:
        with _progress(console) as progress:
            result = evaluate_checkpoint(
                args.checkpoint,
                model,
                data,
                settings,
                device=args.device,
                force_quick_gelu=quick_gelu,
                progress=progress,
            )
    except ImportError as err:
        raise ValueError(str(err)) from err
    console.print(results_table(result))
    for note in result["notes"]:
        console.print(f"[dim]note: {note}[/dim]")
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    return 0


def resolve_model(args: argparse.Namespace) -> tuple[str, bool]:
    """The model name and quick-GELU setting of ``--checkpoint``: flags, else its run's files.

    OpenCLIP's ``params.txt`` two folders above the checkpoint names the model and its
    ``force_quick_gelu``; a kit checkpoint carries its own model. A checkpoint with neither
    needs ``--model``, refused here, before anything is loaded.
    """
    params = run_params(args.checkpoint)
    model = args.model or params.get("model")
    if not model and read_tensor_checkpoint(Path(args.checkpoint)) is not None:
        model = "(the checkpoint's own)"
    if not model and is_trainer_checkpoint(args.checkpoint):
        raise ValueError(
            f"--model is needed for checkpoint {args.checkpoint}. {TRAINER_MODEL_HINT}"
        )
    if not model:
        raise ValueError(
            f"--model is needed: no params.txt was found for checkpoint {args.checkpoint} "
            "(pass the --model the run was trained with, or local-dir:<dir>)"
        )
    if args.model:
        check_model_name(args.model)
    quick_gelu = args.force_quick_gelu
    if quick_gelu is None:
        quick_gelu = params.get("force_quick_gelu") == "True"
    return model, quick_gelu


def check_json_is_not_an_input(json_path: Path | None, checkpoint: Path, data: EvalData) -> None:
    """Refuse a ``--json`` that names a file the evaluation reads.

    The report is written over its target: ``--json epoch_2.pt`` (a slip of the shell's
    completion) would replace the checkpoint with the report, and one naming a CSV the data.
    """
    if json_path is None:
        return
    inputs = [checkpoint, data.test_csv, data.classes, data.train_csv, data.manifest]
    inputs += [*data.suspicious, Path(checkpoint).parent.parent / "params.txt"]
    for source in inputs:
        if source is not None and _same_file(json_path, Path(source)):
            raise ValueError(
                f"--json {json_path} is an input of this evaluation ({source}); writing the "
                "report there would replace it: choose another file name"
            )


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and relative paths included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def resolve_data(args: argparse.Namespace) -> EvalData:
    """The files to read, from --dataset and the per-file flags that override it."""
    overrides = {
        key: value
        for key, value in (
            ("test_csv", args.test_csv),
            ("train_csv", args.train_csv),
            ("classes", args.classes),
            ("manifest", args.manifest),
        )
        if value is not None
    }
    if args.dataset is not None:
        data = EvalData.from_dataset_dir(args.dataset, **overrides)
    elif args.test_csv is not None and args.classes is not None:
        data = EvalData(**overrides)
    else:
        raise ValueError("pass --dataset DIR, or both --test-csv and --classes")
    return EvalData(
        data.test_csv,
        data.classes,
        data.train_csv,
        data.manifest,
        tuple(_suspicious_files(args)),
    )


def _suspicious_files(args: argparse.Namespace) -> list[Path]:
    """Explicit --suspicious files, else the run folder's (only useful with a manifest)."""
    files = list(args.suspicious or [])
    folder = args.run_dir
    if args.manifest is None:
        given = [flag for flag, value in (("--suspicious", files), ("--run-dir", folder)) if value]
        if given or args.k is not None:
            flags = ", ".join(given + (["--k"] if args.k is not None else []))
            raise ValueError(
                f"{flags} score poison detection, which needs the poisoned rows: add "
                "--manifest FILE (the manifest.json of the poisoned training data)"
            )
    if folder is None and not files and args.manifest is not None:
        folder = args.checkpoint.parent
        if not folder.is_dir():
            return files
    if folder is not None:
        epoch = args.suspicious_epoch
        if epoch not in ("latest", "all") and not str(epoch).isdigit():
            raise ValueError(f"--suspicious-epoch {epoch!r}: give an epoch number, latest or all")
        files += find_suspicious(folder, epoch)
    return files


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """Evaluation settings from the parsed flags."""
    for flag in ("test_limit", "backdoor_limit", "probe_limit", "k", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    if not (math.isfinite(args.probe_c) and args.probe_c > 0):
        raise ValueError(
            f"--probe-c must be a finite number > 0, got {args.probe_c} (the inverse of the "
            "probe's L2 strength: smaller regularises more)"
        )
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    return EvalSettings(
        templates=tuple(args.template) if args.template else None,
        linear_probe=args.linear_probe,
        test_limit=args.test_limit,
        backdoor_limit=args.backdoor_limit,
        probe_limit=args.probe_limit,
        probe_c=args.probe_c,
        detection_k=args.k,
        batch_size=args.batch_size,
        seed=args.seed,
    )


@contextmanager
def _progress(console: Console) -> Iterator[ProgressFactory]:
    """A rich progress display; each encoding step gets its own bar."""
    with progress_bars(console) as bars:

        def start(description: str, total: int) -> Any:
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield start


# ---------------------------------------------------------------- output


def results_table(result: dict[str, Any]) -> Table:
    """The headline figures of an evaluation, one row each."""
    epoch = f", epoch {result['epoch']}" if result.get("epoch") is not None else ""
    table = Table(title=f"{result['checkpoint']}{epoch}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("on")
    zs = result["zero_shot"]
    table.add_row(
        "zero-shot accuracy", percent(zs["accuracy"]), f"{zs['correct']}/{zs['images']} images"
    )
    if result.get("linear_probe"):
        lp = result["linear_probe"]
        on = f"{lp['train_images']} train / {lp['test_images']} test images"
        table.add_row("linear-probe accuracy", percent(lp["accuracy"]), on)
    if result.get("targeted"):
        t = result["targeted"]
        on = f"{t['successes']}/{t['targets']} targets in their adversarial class"
        table.add_row("targeted attack success", percent(t["success_rate"]), on)
    if result.get("backdoor"):
        b = result["backdoor"]
        on = f"{b['hits']}/{b['images']} triggered images -> {b['target_class']} ({b['trigger']})"
        if "clean_target_rate" in b:
            on += f"; {percent(b['clean_target_rate'])} without trigger"
        table.add_row("backdoor attack success", percent(b["success_rate"]), on)
    for d in result.get("detection") or []:
        name = f"detection, epoch {d['epoch']}" if d["epoch"] is not None else "detection"
        on = (
            f"top {d['k']} of {d['listed']} rows: {d['hits']}/{d['poisoned']} poisoned found, "
            f"recall {percent(d['recall'])}, AP {d['average_precision']:.3f}"
        )
        table.add_row(f"{name} precision@k", percent(d["precision"]), on)
    return table
