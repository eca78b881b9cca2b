"""The statistics room: what matching and the risk split did, keyed by stable sample ids.

Every entry point (the OpenCLIP adapter, ``roclip_torch``'s adapter and Trainer, the kit's
tensor path, ``roclip smoke``) registers one :class:`MatchStatsCollector` on the defense's hooks
instead of summing its own figures, so a margin, a risky count or a suspicious row means the
same thing whichever trainer ran. The collector keeps the epoch's most suspicious rows in a
bounded :class:`TopRows` (a large run never holds every margin of an epoch), and this module
holds the one writer and the one reader of the suspicious-rows CSV
(``suspicious_epoch_N.csv``, columns ``index,key,caption,margin``) and its file-name pattern.

The core imports no integration: a trainer describes its rows (dataset index, WebDataset key,
caption) through the opaque ``payload`` it hands the collector, and turns them into
:class:`SuspiciousRow` itself.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from roclip_plugin.contrastive import DistInfo, MatchStats, RiskStats
from roclip_plugin.distributed import all_reduce_sum
from roclip_plugin.hookspecs import hookimpl
from roclip_plugin.risk import stable_ids

SUSPICIOUS_TOP = 1000
"""Rows a suspicious-rows CSV keeps by default: enough to score precision at the usual k."""
SUSPICIOUS_COLUMNS = ("index", "key", "caption", "margin")
SUSPICIOUS_GLOB = "suspicious_epoch_*.csv"
SUSPICIOUS_PATTERN = re.compile(r"suspicious_epoch_(\d+)\.csv$")


def suspicious_name(epoch: int) -> str:
    """The file name of epoch ``epoch``'s suspicious rows (``epoch`` counted from 1)."""
    return f"suspicious_epoch_{epoch}.csv"


def suspicious_epoch(path: Path | str) -> int | None:
    """The epoch number a suspicious-rows file's name carries (None for another name)."""
    match = SUSPICIOUS_PATTERN.search(Path(path).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class SuspiciousRow:
    """One line of a suspicious-rows CSV.

    Attributes:
        index: the dataset row (CSV training data, in-memory tensors); -1 where there is none.
        key: the WebDataset ``__key__``; "" where there is none.
        caption: the row's caption ("" when the trainer did not know it).
        margin: matched-minus-own similarity, or the risk split's risk where the split judged
            the epoch (higher is more suspicious either way).
    """

    index: int
    key: str
    caption: str
    margin: float


def write_suspicious(path: Path | str, rows: Iterable[SuspiciousRow]) -> Path:
    """Write ``rows`` in the given order (most suspicious first) as ``index,key,caption,margin``.

    Every path writes the same four columns (an empty ``key`` without WebDataset keys), so one
    reader serves every trainer's files.
    """
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(SUSPICIOUS_COLUMNS)
        for row in rows:
            writer.writerow([row.index, row.key, row.caption, f"{row.margin:.6f}"])
    return path


def read_suspicious_rows(path: Path | str) -> list[SuspiciousRow]:
    """The rows of a suspicious-rows CSV, in file order.

    Accepts the older files without a ``key`` column (``index,caption,margin``, written by the
    kit's tensor path before the columns were unified). Raises ``ValueError`` naming the file
    when a required column is missing or a value is not a number.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for column in ("index", "margin"):
            if column not in columns:
                raise ValueError(
                    f"suspicious file {path} has no {column!r} column (columns: "
                    f"{', '.join(columns)}); pass a suspicious_epoch_N.csv written by "
                    "roclip-openclip-train"
                )
        try:
            return [
                SuspiciousRow(
                    int(r["index"]), r.get("key") or "", r.get("caption") or "", float(r["margin"])
                )
                for r in reader
            ]
        except (TypeError, ValueError) as err:
            raise ValueError(f"suspicious file {path}: a row is not a number ({err})") from err


def row_id(row: SuspiciousRow) -> int | None:
    """The stable sample id of a written row: its index, else its key's id, else None."""
    if row.index >= 0:
        return row.index
    return int(stable_ids([row.key])[0]) if row.key else None


class TopRows:
    """The ``k`` highest scores seen, at most one per known sample id, in bounded memory.

    Ranked by decreasing score, ties to the entry seen first, and a sample id seen twice (a
    padded distributed epoch, a resampled shard) keeps its best entry: exactly the first ``k``
    distinct ids of a stable descending sort of everything added, without keeping everything.
    Entries without an id are never merged. Each entry carries an opaque payload (what the
    trainer knows of the row), kept for the retained entries only.
    """

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self._next = 0
        self._scores = torch.empty(0, dtype=torch.float32)
        self._ids = torch.empty(0, dtype=torch.long)
        self._known = torch.empty(0, dtype=torch.bool)
        self._seq = torch.empty(0, dtype=torch.long)
        self._payload: list[Any] = []

    def __len__(self) -> int:
        return len(self._payload)

    def add(
        self,
        scores: torch.Tensor,
        ids: torch.Tensor | None = None,
        payload: Sequence[Any] | None = None,
    ) -> None:
        """Offer one batch: ``scores`` ``[n]``, its ids (None: unknown), its payloads."""
        if self.k <= 0:
            return  # nothing kept: leave the scores on their device (no synchronisation)
        scores = scores.detach().float().cpu().reshape(-1)
        n = scores.numel()
        if n == 0:
            return
        known = torch.full((n,), ids is not None, dtype=torch.bool)
        new_ids = torch.zeros(n, dtype=torch.long) if ids is None else ids.cpu().long().reshape(-1)
        extra = list(payload) if payload is not None else [None] * n
        seq = torch.arange(self._next, self._next + n)
        self._next += n
        self._keep(
            torch.cat([self._scores, scores]),
            torch.cat([self._ids, new_ids]),
            torch.cat([self._known, known]),
            torch.cat([self._seq, seq]),
            self._payload + extra,
        )

    def _keep(
        self,
        scores: torch.Tensor,
        ids: torch.Tensor,
        known: torch.Tensor,
        seq: torch.Tensor,
        payload: list[Any],
    ) -> None:
        by_seq = torch.argsort(seq)
        order = by_seq[torch.argsort(scores[by_seq], descending=True, stable=True)]
        order = order[_first_of_each_id(ids[order], known[order])][: self.k]
        self._scores, self._ids = scores[order], ids[order]
        self._known, self._seq = known[order], seq[order]
        self._payload = [payload[i] for i in order.tolist()]

    def ranked(self) -> list[tuple[float, int | None, Any]]:
        """``(score, id or None, payload)`` of the kept entries, most suspicious first."""
        ids = [int(i) if k else None for i, k in zip(self._ids, self._known, strict=True)]
        return list(zip(self._scores.tolist(), ids, self._payload, strict=True))


def _first_of_each_id(ids: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mask of the entries to keep: every unknown one, the first of each known id."""
    keep = ~known
    if known.any():
        positions = torch.arange(len(ids))[known]
        _, inverse = torch.unique(ids[known], return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(ids), dtype=torch.long)
        first = first.scatter_reduce(0, inverse, positions, "amin")
        keep[first] = True
    return keep


def top_suspicious(parts: Iterable[Sequence[SuspiciousRow]], k: int) -> list[SuspiciousRow]:
    """The ``k`` most suspicious of several ranked lists (one per rank), ids merged.

    Ties go to the earlier list, so gathering in rank order gives every rank the same file.
    """
    top = TopRows(k)
    for rows in parts:
        ids = [row_id(r) for r in rows]
        if not rows:
            continue
        known = torch.tensor([i is not None for i in ids])
        values = torch.tensor([-1 if i is None else i for i in ids], dtype=torch.long)
        scores = torch.tensor([r.margin for r in rows], dtype=torch.float32)
        _add_mixed(top, scores, values, known, list(rows))
    return [payload for _, _, payload in top.ranked()]


def _add_mixed(
    top: TopRows, scores: torch.Tensor, ids: torch.Tensor, known: torch.Tensor, rows: list[Any]
) -> None:
    """Add entries of which only some have ids (one call per contiguous run keeps the order)."""
    start = 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or bool(known[end]) != bool(known[start]):
            span = slice(start, end)
            top.add(scores[span], ids[span] if bool(known[start]) else None, rows[span])
            start = end


@dataclass(frozen=True)
class MatchSummary:
    """Matching statistics of one epoch (so far), over every rank.

    Attributes:
        matching_steps: steps that matched against the pool (the same on every rank).
        samples: images matched, summed over ranks.
        matched_similarity: mean cosine similarity of an image to its matched pool caption,
            averaged over matching steps and ranks; NaN when nothing matched.
        own_similarity: the same for an image and its own caption.
        suspicious: images whose margin (matched minus own similarity) exceeded the threshold,
            summed over ranks: poison candidates.
    """

    matching_steps: int = 0
    samples: int = 0
    matched_similarity: float = math.nan
    own_similarity: float = math.nan
    suspicious: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for logs and checkpoints."""
        return asdict(self)


@dataclass(frozen=True)
class RiskSplitCounts:
    """What the risk split judged in an epoch, scored against the poison manifest if known.

    Attributes:
        steps: steps the split judged.
        risky: pairs judged risky.
        caught: risky pairs that are poisoned (0 without a manifest).
        poisoned: poisoned pairs of judged steps (0 without a manifest).
    """

    steps: int = 0
    risky: int = 0
    caught: int = 0
    poisoned: int = 0

    @property
    def precision(self) -> float | None:
        """Share of the risky pairs that are poisoned (None when nothing was risky)."""
        return self.caught / self.risky if self.risky else None

    @property
    def recall(self) -> float | None:
        """Share of the judged poisoned pairs that were risky (None when none was judged)."""
        return self.caught / self.poisoned if self.poisoned else None


class MatchStatsCollector:
    """One epoch's match and risk statistics of this rank, keyed by sample ids (a plugin).

    Args:
        margin: a matched image counts as suspicious when its margin exceeds this (cosine
            units); normally ``RoClipConfig.suspicious_margin``.
        keep: suspicious rows kept per epoch (0: none, so no margin leaves the device).
        poisoned: where the trainer knows the poison manifest, a boolean per sample id (the
            ids index it): the risk split is then scored (precision and recall inputs).

    A trainer that knows more of its rows than their ids sets :attr:`payload` to the step's
    row descriptions before each step's first loss call; they travel with the kept rows.
    """

    def __init__(
        self, margin: float, *, keep: int = 0, poisoned: torch.Tensor | None = None
    ) -> None:
        self.margin = margin
        self.keep = int(keep)
        self.poisoned = None if poisoned is None else poisoned.bool().cpu()
        self.payload: Sequence[Any] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget everything collected (called at each epoch start)."""
        self.steps = 0
        self.samples = 0
        self.matched_sum = 0.0
        self.own_sum = 0.0
        self.above_margin = 0
        self.risk = RiskSplitCounts()
        self.risky_matched = 0
        self.margins = TopRows(self.keep)
        self.risks = TopRows(self.keep)

    @hookimpl
    def roclip_after_match(self, stats: MatchStats) -> None:
        """Accumulate one matching step of this rank."""
        self.steps += 1
        self.samples += int(stats.margins.numel())
        self.matched_sum += stats.matched_similarity
        self.own_sum += stats.own_similarity
        self.above_margin += int((stats.margins > self.margin).sum())
        self.margins.add(stats.margins, stats.ids, self.payload)

    @hookimpl
    def roclip_after_risk(self, stats: RiskStats) -> None:
        """Accumulate one step the risk split judged."""
        risky = stats.risky.cpu()
        caught = poisoned = 0
        if self.poisoned is not None and stats.ids is not None:
            bad = self.poisoned[stats.ids.cpu()]
            caught, poisoned = int((risky & bad).sum()), int(bad.sum())
        r = self.risk
        self.risk = RiskSplitCounts(
            r.steps + 1, r.risky + int(risky.sum()), r.caught + caught, r.poisoned + poisoned
        )
        if stats.action == "match":
            self.risky_matched += int(risky.sum())
        self.risks.add(stats.risk, stats.ids, self.payload)

    @property
    def suspicious(self) -> int:
        """Pairs this rank held for poison, whatever the step did to them.

        Margins over the threshold where images were matched, and the risky pairs of steps
        that matched none (drop, unimodal, weight); a matched step's risky pairs are already
        counted by their margins.
        """
        return self.above_margin + self.risk.risky - self.risky_matched

    def ranked(self) -> list[tuple[float, int | None, Any]]:
        """The epoch's most suspicious rows: by risk where the split judged, else by margin.

        The risk is the defense's own judgement of the pair, so where there is one it is what
        the suspicious-rows CSV ranks by (its ``margin`` column then holds the risk).
        """
        return (self.risks if self.risk.steps else self.margins).ranked()

    def suspicious_rows(
        self, describe: Callable[[int | None, Any], tuple[int, str, str]] | None = None
    ) -> list[SuspiciousRow]:
        """:meth:`ranked` as CSV rows; ``describe(id, payload)`` gives (index, key, caption)."""
        describe = describe or _index_only
        return [SuspiciousRow(*describe(i, p), s) for s, i, p in self.ranked()]

    def summary(self, info: DistInfo | None = None) -> MatchSummary:
        """Statistics of the epoch so far, reduced over ranks when ``info`` says there are several.

        With several ranks this is a collective: every rank must call it.
        """
        totals = torch.tensor(
            [self.steps, self.samples, self.matched_sum, self.own_sum, self.above_margin],
            dtype=torch.float64,
        )
        world = 1 if info is None else info.world_size
        if world > 1:
            totals = all_reduce_sum(totals)
        steps_all_ranks, samples, matched, own, suspicious = totals.tolist()
        if steps_all_ranks == 0:
            return MatchSummary()
        return MatchSummary(
            matching_steps=round(steps_all_ranks / world),
            samples=round(samples),
            matched_similarity=matched / steps_all_ranks,
            own_similarity=own / steps_all_ranks,
            suspicious=round(suspicious),
        )


def _index_only(sample_id: int | None, payload: Any) -> tuple[int, str, str]:
    return (-1 if sample_id is None else sample_id), "", ""
