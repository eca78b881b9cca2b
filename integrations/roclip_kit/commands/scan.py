"""``roclip scan``: rank a dataset's pairs by how poisoned they look, report, and filter it.

The ``roclip`` command mounts this with :func:`add_scan_command`; ``run`` takes the parsed
arguments and a rich console and returns an exit code, raising ``ValueError`` with the flag and
the fix for bad input (the caller prints one line and exits 2). Every flag and file is checked
before the model is loaded. docs/scan.md.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from roclip_kit.commands.console import percent, progress_bars
from roclip_kit.commands.eval import add_model_arguments, resolve_model
from roclip_kit.evaluate.features import ProgressFactory
from roclip_kit.evaluate.scan import (
    DEFAULT_CHUNK_SIZE,
    EMBEDDINGS_DIR,
    FILTERED_CSV,
    HISTOGRAM_PNG,
    KEPT_KEYS,
    SCORES_CSV,
    Ranks,
    ScanResult,
    dataset_csv,
    detection_report,
    draw_histograms,
    drop_size,
    poisoned_by_attack,
    ranked_rows,
    read_pairs,
    read_shard_pairs,
    report_dict,
    scan_pairs,
    use_threads,
    write_filtered_csv,
    write_kept_keys,
    write_report,
    write_scores_csv,
)
from roclip_kit.train.models import check_checkpoint_path, load_openclip
from roclip_plugin.distributed import is_distributed, launch_world_size, rank_and_world_size
from roclip_plugin.io import check_output_dir, require_file
from roclip_plugin.scan import DETECTORS, ScanSettings
from roclip_plugin.validation import check_device, path_arg

TOP_SHOWN = 10


def add_scan_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``scan`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "scan",
        help="Rank a dataset's pairs by how poisoned they look; report; write a filtered CSV.",
        description="Embed every pair of a dataset with a trained checkpoint, score each with "
        "several poison detectors (own cosine, caption margin, k-distance, SLOF, DAO, the "
        "fit to the caption's peers, a targeted-duplicates score and their combination), and "
        "write the ranked pairs, a report and a filtered training CSV. See docs/scan.md.",
    )
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=path_arg, metavar="DIR", help="scan DIR/train.csv")
    data.add_argument("--csv", type=path_arg, help="an OpenCLIP CSV to scan (filepath, title)")
    data.add_argument(
        "--shards",
        metavar="SPEC",
        help="WebDataset shards to scan, e.g. '/data/{00000..00009}.tar' (rows keyed by "
        "__key__; the filter's output is the kept keys)",
    )
    data.add_argument("--manifest", type=path_arg, help="poison manifest: AUROC and precision@k")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=path_arg, required=True, help="output folder")
    out.add_argument("--resume", action="store_true", help="continue a stopped scan in --out")
    out.add_argument(
        "--drop-fraction", type=float, help="write train_filtered.csv without this top share"
    )
    out.add_argument("--drop-count", type=int, help="... or without this many top rows")
    out.add_argument(
        "--drop-by",
        default="combined",
        choices=DETECTORS,
        help="the score that ranks rows for the report and the filter (default: %(default)s)",
    )
    scan = parser.add_argument_group("detectors")
    defaults = ScanSettings()
    scan.add_argument("--k", type=int, default=defaults.k, help="neighbours (default: %(default)s)")
    scan.add_argument(
        "--reference-size",
        type=int,
        default=defaults.reference_size,
        help="images of the density reference, 0 for all (default: %(default)s)",
    )
    scan.add_argument(
        "--peer-reference-size",
        type=int,
        default=defaults.peer_reference_size,
        help="pairs searched for each caption's peers (peers, misfit), 0 for all "
        "(default: %(default)s)",
    )
    scan.add_argument("--seed", type=int, default=0, help="draws the references (default: 0)")
    scan.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of the model and the searches; 0: the libraries' defaults. On a "
        "shared, busy machine 1 is much faster (docs/scan.md)",
    )
    scan.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="pairs per embedding chunk on disk (default: %(default)s)",
    )
    parser.set_defaults(run=run_scan)
    return parser


def settings_from_args(args: argparse.Namespace) -> ScanSettings:
    """The detectors' settings; a bad value is refused naming its flag."""
    checks = (
        ("k", 1),
        ("reference_size", 0),
        ("peer_reference_size", 0),
        ("seed", 0),
        ("chunk_size", 1),
        ("threads", 0),
    )
    for flag, low in checks:
        value = getattr(args, flag)
        if value < low:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {low} (got {value})")
    for flag in ("reference_size", "peer_reference_size"):
        size, name = getattr(args, flag), "--" + flag.replace("_", "-")
        if size == 1:
            raise ValueError(f"{name} 1 holds no neighbour: give at least 2, or 0 for all")
        if size and args.k >= size:
            raise ValueError(
                f"--k {args.k} needs a reference of more than {args.k} rows ({name} "
                f"{size}): lower --k or raise {name}"
            )
    return ScanSettings(
        k=args.k,
        reference_size=args.reference_size or None,
        peer_reference_size=args.peer_reference_size or None,
        seed=args.seed,
    )


def check_drop(args: argparse.Namespace) -> None:
    """``--drop-fraction`` in [0, 1) or ``--drop-count`` >= 0, not both."""
    if args.drop_fraction is not None and args.drop_count is not None:
        raise ValueError("--drop-fraction and --drop-count both given: keep one")
    fraction = args.drop_fraction
    if fraction is not None and not (math.isfinite(fraction) and 0 <= fraction < 1):
        raise ValueError(f"--drop-fraction must be in [0, 1), got {fraction} (0.01 drops 1%)")
    if args.drop_count is not None and args.drop_count < 0:
        raise ValueError(f"--drop-count must be 0 or more, got {args.drop_count}")


def check_drop_size(args: argparse.Namespace, rows: int) -> None:
    """Refuse a drop that leaves no row: OpenCLIP cannot train on a header alone."""
    drop = drop_size(rows, args.drop_fraction, args.drop_count)
    if args.drop_count is not None and drop >= rows:
        raise ValueError(
            f"--drop-count {args.drop_count} drops every one of the {rows} rows of the CSV; "
            "give fewer (or --drop-fraction)"
        )


def data_source(args: argparse.Namespace) -> Path | str:
    """The data to scan: a CSV path (``--csv``, ``--dataset``) or a shard spec (``--shards``)."""
    if args.shards is None:
        return dataset_csv(args.dataset, args.csv)
    if args.dataset is not None or args.csv is not None:
        raise ValueError("--shards and --dataset/--csv both given: scan one of them")
    if not args.shards.strip():
        raise ValueError("--shards is empty: give shards like '/data/{00000..00009}.tar'")
    return str(args.shards)


def check_args(args: argparse.Namespace) -> tuple[ScanSettings, Path | str]:
    """Every check that needs no model: flags, files, the output folder."""
    out = check_output_dir(args.out, "--out")
    check_device(args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {args.batch_size})")
    settings = settings_from_args(args)
    check_drop(args)
    check_checkpoint_path(args.checkpoint)
    source = data_source(args)
    if args.manifest is not None:
        require_file(args.manifest, "--manifest")
    embeddings = out / EMBEDDINGS_DIR / "progress.json"
    if embeddings.exists() and not args.resume:
        raise ValueError(
            f"--out {out} holds a scan already: add --resume to continue it, or choose "
            "another --out"
        )
    return settings, source


@contextmanager
def process_group() -> Iterator[Ranks]:
    """The scan's ranks: torchrun's (``WORLD_SIZE`` > 1 in the environment), else one process.

    Under torchrun a gloo group is started (the ranks only wait for each other and share a
    folder, so the CPU backend serves whatever device embeds) and ended on the way out.
    """
    if launch_world_size() <= 1:
        yield Ranks()
        return
    import torch.distributed as dist

    started = not is_distributed()
    if started:
        dist.init_process_group("gloo")
    try:
        rank, world = rank_and_world_size()
        yield Ranks(rank, world, dist.barrier)
    finally:
        if started:
            dist.destroy_process_group()


def run_scan(args: argparse.Namespace, console: Console) -> int:
    """Scan (split over torchrun's processes, if any), print the report, write the outputs."""
    with process_group() as ranks:
        return scan_as(args, console, ranks)


def scan_as(args: argparse.Namespace, console: Console, ranks: Ranks) -> int:
    """One process's part: every rank embeds its chunks, rank 0 scores and writes."""
    settings, source = check_args(args)
    pairs = read_pairs(source) if isinstance(source, Path) else read_shard_pairs(source)
    check_drop_size(args, len(pairs))
    poisoned = poisoned_by_attack(args.manifest, pairs) if args.manifest else None
    model, quick_gelu = resolve_model(args)
    if ranks.rank == 0:
        console.print(
            f"Scanning [bold]{len(pairs)}[/bold] pairs of {pairs.source} with {args.checkpoint}"
            + (f" in {ranks.world} processes" if ranks.world > 1 else "")
        )
    try:
        loaded = load_openclip(args.checkpoint, model, args.device, force_quick_gelu=quick_gelu)
    except ImportError as err:
        raise ValueError(str(err)) from err
    out = Path(args.out)
    use_threads(args.threads)
    ranks.barrier()  # every rank checked --out before rank 0 makes the store there
    with _progress(console, show=ranks.rank == 0) as progress:
        result = scan_pairs(
            loaded,
            pairs,
            out / EMBEDDINGS_DIR,
            settings,
            resume=args.resume,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            progress=progress,
            ranks=ranks,
        )
    if result is not None:  # rank 0: the others only embed
        write_outputs(args, console, result, poisoned)
    return 0


def write_outputs(
    args: argparse.Namespace, console: Console, result: ScanResult, poisoned: Any
) -> None:
    """Scores CSV, report (with detection or histograms), the filtered CSV and the kept keys."""
    out = Path(args.out)
    written = [write_scores_csv(out / SCORES_CSV, result, args.drop_by)]
    detection = detection_report(result.scores, poisoned) if poisoned is not None else None
    if detection is None:
        written.append(draw_histograms(result.scores, out / HISTOGRAM_PNG))
    drop = drop_size(len(result.pairs), args.drop_fraction, args.drop_count)
    if args.drop_fraction is not None or args.drop_count is not None:
        rows = ranked_rows(result.scores, args.drop_by)[:drop]
        if result.pairs.csv is not None:
            written.append(write_filtered_csv(result.pairs.csv, out / FILTERED_CSV, rows))
        written.append(write_kept_keys(out / KEPT_KEYS, result.pairs, rows))
        kept = FILTERED_CSV if result.pairs.csv is not None else KEPT_KEYS
        result.notes.append(
            f"{kept}: {len(result.pairs) - drop} rows kept, the {drop} highest by "
            f"{args.drop_by} dropped"
        )
    report = report_dict(result, detection)
    written += list(write_report(out, report))
    console.print(top_table(result, args.drop_by))
    if detection is not None:
        console.print(detection_table(detection))
    rate = result.pairs_per_second
    cost = f", {rate:.0f} pairs/s" if rate else ""
    console.print(
        f"embedded in {result.embed_seconds:.1f} s, scored in {result.score_seconds:.1f} s{cost}"
    )
    for note in result.notes:
        console.print(f"[dim]note: {note}[/dim]")
    for path in written:
        console.print(f"wrote {path}")


def top_table(result: ScanResult, by: str, count: int = TOP_SHOWN) -> Table:
    """The most suspicious pairs, so a first look needs no spreadsheet."""
    table = Table(title=f"most suspicious pairs by {by} (all of them in {SCORES_CSV})")
    table.add_column("row", justify="right")
    table.add_column("caption", overflow="ellipsis", no_wrap=True, max_width=60)
    table.add_column(by, justify="right")
    for row in ranked_rows(result.scores, by)[:count]:
        key = result.pairs.key_of(row)
        table.add_row(key, result.pairs.captions[row], f"{result.scores[by][row]:.4g}")
    return table


def detection_table(detection: dict[str, Any]) -> Table:
    """AUROC and precision@k of each detector, for all poison and each attack kind."""
    groups = [g for g in ("all", "backdoor", "targeted") if g in detection["combined"]]
    table = Table(title="poison detection (AUROC / precision@k)")
    table.add_column("detector")
    for group in groups:
        table.add_column(f"{group} (k={detection['combined'][group]['k']})", justify="right")
    for name, figures in detection.items():
        cells = [
            f"{figures[g]['auroc']:.3f} / {percent(figures[g]['precision_at_k'])}" for g in groups
        ]
        table.add_row(name, *cells)
    return table


@contextmanager
def _progress(console: Console, show: bool = True) -> Iterator[ProgressFactory | None]:
    """Bars with the time left; each step of the scan gets its own (none unless ``show``)."""
    if not show:
        yield None
        return
    with progress_bars(console, elapsed=True) as bars:

        def start(description: str, total: int) -> Any:
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield start
