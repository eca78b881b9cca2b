"""Example plugin: append RoCLIP's matching statistics to a CSV file, one row per matching step.

It uses only the public hooks, so it works unchanged under every integration (this loop,
OpenCLIP, or a loop driving ``RoClipDefense`` directly). Install it for every run through the
entry-point group ``roclip``::

    [project.entry-points.roclip]
    csv_stats = "roclip_torch.csv_stats:plugin"

or register it on one plugin manager: ``pm.register(CsvMatchStats("stats.csv", margin=0.3))``.

Settings, first found wins: the constructor's arguments; the flags
``--roclip-csv-stats-path`` / ``--roclip-csv-stats-margin`` (added through
``roclip_add_options`` when the integration builds its parser); the environment variables
``ROCLIP_CSV_STATS_PATH`` / ``ROCLIP_CSV_STATS_MARGIN``; the defaults ``roclip_match_stats.csv``
and the configuration's ``suspicious_margin``. Under ``torch.distributed`` rank ``r > 0``
writes ``<stem>.rank<r>.csv`` (each rank sees its own local batch). Rows are appended, so a
resumed run continues the file of the interrupted one.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from roclip_plugin.config import RoClipConfig
from roclip_plugin.distributed import process_rank
from roclip_plugin.hookspecs import hookimpl
from roclip_plugin.loss import MatchStats

PATH_ENV = "ROCLIP_CSV_STATS_PATH"
MARGIN_ENV = "ROCLIP_CSV_STATS_MARGIN"
DEFAULT_PATH = "roclip_match_stats.csv"
FIELDS = (
    "epoch",
    "step",
    "pool_fill",
    "pool_size",
    "matched_similarity",
    "own_similarity",
    "samples",
    "above_margin",
    "margin",
)


class CsvMatchStats:
    """Writes ``roclip_after_match`` statistics to a CSV file (a pluggy plugin).

    Args:
        path: the CSV file; None resolves it at ``roclip_configure`` (see the module doc).
        margin: count samples whose margin (matched minus own cosine similarity) exceeds
            this; None resolves it likewise.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, margin: float | None = None):
        self._explicit_path = None if path is None else Path(path)
        self._explicit_margin = margin
        self.path = self._explicit_path or Path(DEFAULT_PATH)
        self.margin = 0.2 if margin is None else margin

    @hookimpl
    def roclip_add_options(self, parser: argparse.ArgumentParser) -> None:
        """Offer ``--roclip-csv-stats-path`` and ``--roclip-csv-stats-margin``."""
        parser.add_argument("--roclip-csv-stats-path", default=None, help="CSV of match stats.")
        parser.add_argument(
            "--roclip-csv-stats-margin",
            type=float,
            default=None,
            help="Count samples whose matched-minus-own similarity exceeds this.",
        )

    @hookimpl
    def roclip_configure(self, config: RoClipConfig, options: argparse.Namespace | None) -> None:
        """Resolve the file and the margin threshold for this run."""
        path = self._explicit_path or _first(
            getattr(options, "roclip_csv_stats_path", None), os.environ.get(PATH_ENV)
        )
        self.path = _rank_path(Path(path) if path else Path(DEFAULT_PATH))
        margin = _first(
            self._explicit_margin,
            getattr(options, "roclip_csv_stats_margin", None),
            os.environ.get(MARGIN_ENV),
        )
        self.margin = config.suspicious_margin if margin is None else float(margin)

    @hookimpl
    def roclip_after_match(self, stats: MatchStats) -> None:
        """Append one row for this rank's local batch."""
        above = int((stats.margins > self.margin).sum())
        row = {
            "epoch": stats.epoch,
            "step": stats.step,
            "pool_fill": stats.pool_fill,
            "pool_size": stats.pool_size,
            "matched_similarity": f"{stats.matched_similarity:.6f}",
            "own_similarity": f"{stats.own_similarity:.6f}",
            "samples": int(stats.margins.numel()),
            "above_margin": above,
            "margin": self.margin,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)


def _first(*values: object) -> object:
    return next((v for v in values if v is not None), None)


def _rank_path(path: Path) -> Path:
    rank = process_rank()
    if rank > 0:
        return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    return path


plugin = CsvMatchStats()
"""The instance the entry point ``roclip_torch.csv_stats:plugin`` registers."""
