"""Robustness benchmark: CLIP vs RoCLIP variants under targeted poisoning and backdoors.

The grid (datasets x seeds x backdoor rates x variants) runs on the kit's tensor-resident path
(``roclip_kit.train.tensor``: OpenCLIP's ``CLIP`` class, RoCLIP through ``roclip_torch``), at
the demo's faithful scale-down of the paper's attacks: the full training set, 32 targets (16
with 10 and 16 with 50 captions of an adversarial class), a blended-noise backdoor at each
rate, a pool of 4,096 captions, 12 epochs (docs/results.md has the ratios next to the
paper's). Every run is evaluated after every epoch and in full after the last, by
``roclip eval``'s code.

It prints one JSON line per finished run, then a markdown table of means and standard
deviations over seeds, and writes ``results.md`` and ``summary.json`` into ``--out``. Each run's
figures are kept in ``--out/runs/*.json`` as soon as it finishes, so a stopped grid resumes
where it stopped (finished runs are not trained again), and a run stopped mid-way continues
from its last finished epoch (``--out/work/<cell>/<variant>/checkpoints``). Nothing is
asserted: it reports what it measured, with the device and the date.

Variants (``--variants``), on top of the scale's RoCLIP settings:
  clip           plain CLIP, no augmentation
  aug-only       CLIP with RoCLIP's augmentation (image and caption), no matching
  match-only     RoCLIP's matching without augmentation
  roclip         RoCLIP as the paper runs it (the paper preset at the scale's schedule)
  reference      the authors' semantics (--roclip-preset reference: match from the second
                 epoch every K, pool updated in matching epochs only), same pool and images
  every-epoch    matching every epoch after the warm-up (--roclip-defend-every 1)
  adaptive       matching starts once in-batch retrieval accuracy reaches the threshold
  robust         the default preset (risky tenth dropped, images augmented, captions not)
  robust-eda     robust with EDA captions, as the default ran until 2026-12-07
  safeclip       SafeCLIP's preset, its unimodal warm-up scaled to 2 of 12 epochs
  robust-light   robust with the lighter crop roclip-light (0.8-1.0 of the image)
  robust-augonly the default's image augmentation alone, no defense
  floor          robust on the clean rows only (floor-eda: robust-eda's, floor-light:
                 robust-light's), what an attack scores when nothing is learned from the poison
  NAME:field=value,...   any other RoCLIP settings (--extra)

    python benchmarks/bench_robustness.py --out robustness               # the CPU grid
    python benchmarks/bench_robustness.py --device cuda --jobs 6 --out robustness-gpu
    python benchmarks/bench_robustness.py --quick --out /tmp/rb          # a check of the script
    python benchmarks/bench_robustness.py --out robustness --report      # the table so far
    python benchmarks/bench_robustness.py --trigger wanet --rates 0.001 --variants clip robust
    python benchmarks/bench_robustness.py --grad-clip-norm 1 --out robustness-gc1  # clipped recipe
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
from roclip_kit.demo.run import build_data, poison
from roclip_kit.demo.runs import RunsFailed, RunSpec, default_threads, run_specs
from roclip_kit.demo.settings import TRIGGER_KINDS, DemoSettings

from roclip_plugin.config import preset_name
from roclip_plugin.config_aliases import saved_defended_epochs

_DROP = {"preset": "paper", "match_action": "drop", "first_defended_epoch": 0, "defend_every": 1}
VARIANTS: dict[str, tuple[dict[str, Any] | None, bool]] = {
    "clip": (None, True),
    "aug-only": ({"preset": "paper"}, False),
    "match-only": ({"preset": "paper", "image_aug": "none", "text_aug": "none"}, True),
    # the paper's configuration by name, whatever the default preset is (saved runs keep it)
    "roclip": ({"preset": "paper"}, True),
    "reference": ({"preset": "reference"}, True),
    "every-epoch": ({"preset": "paper", "defend_every": 1}, True),
    "adaptive": ({"preset": "paper", "schedule": "adaptive", "first_defended_epoch": 2}, True),
    # Beyond the paper (docs/config.md): every epoch from the first, leave out of the loss the
    # share of each batch whose own caption fits worst next to their nearest pool caption.
    "drop10": (_DROP | {"match_fraction": 0.1}, True),
    "drop25": (_DROP | {"match_fraction": 0.25}, True),
    # The presets (docs/risk.md): the benchmark's pick, and SafeCLIP scaled to 12 epochs (its
    # 5 unimodal warm-up epochs of 32 become 2).
    "robust": ({"preset": "robust"}, True),
    "safeclip": ({"preset": "safeclip", "unimodal_warmup_epochs": 2}, True),
    # robust as it was before captions lost EDA (2026-12-07): EDA's deletions and synonyms
    # remove or replace the class word of some short captions ("an image of the pullover" ->
    # "an image of the"), at a clean-accuracy cost on Fashion-MNIST (docs/results.md).
    "robust-eda": ({"preset": "robust", "text_aug": "eda"}, True),
    # Candidates for robust: without image augmentation (its clean-accuracy cost on
    # Fashion-MNIST; noimg kept EDA, as it ran), and a fifth of each batch instead of a tenth.
    "robust-noimg": ({"preset": "robust", "image_aug": "none", "text_aug": "eda"}, True),
    "robust-noaug": ({"preset": "robust", "image_aug": "none"}, True),
    # The default's augmentation without its defense (what the image augmentation alone does to
    # a run: bench_steps.py traces it on the clean rows beside robust-noaug, results.md).
    "robust-augonly": ({"preset": "robust"}, False),
    "robust20": ({"preset": "robust", "match_fraction": 0.2}, True),
    # A lighter crop (0.8-1.0 of the image, roclip-light): more clean zero-shot than robust in
    # every cell of the CPU grid, more attack success in five of six (results.md).
    "robust-light": ({"preset": "robust", "image_aug": "roclip-light"}, True),
    # A longer per-sample memory: the newest visit weighs 0.2 instead of 0.5, so a pair the
    # model has come to fit is remembered as a bad fit for more epochs (results.md).
    "robust-d02": ({"preset": "robust", "history_decay": 0.2}, True),
    # Judging from the first epoch: a pair's first visit is its whole record then, and the
    # copies that teach a target get through in the first epochs (results.md).
    "robust-e0": ({"preset": "robust", "first_defended_epoch": 0}, True),
    # Images augmented in the first 8 epochs of 12 only: the last third trains on images as the
    # test sees them, once the history has judged every pair (results.md).
    "robust-s8": ({"preset": "robust", "image_aug_stop_epoch": 8}, True),
    # The same switch two epochs later: robust-s8's plain third let an early-learned MNIST
    # trigger show that four more augmented epochs wash out (results.md); two plain epochs
    # keep less of the clean accuracy it bought, and may leave less of the trigger.
    "robust-s10": ({"preset": "robust", "image_aug_stop_epoch": 10}, True),
    # Risky pairs stay negatives of the others; only their own link leaves the loss. Level
    # with the default on MNIST (3 seeds), not ahead, and its zero-shot fell early on one run
    # of nine as the default's did (results.md).
    "robust-neg": ({"preset": "robust", "risky_negatives": "keep"}, True),
}
# Each recipe's floor: the same recipe trained on the clean rows only (the poisoned ones removed
# by the manifest), what the attacks score when nothing was learned from the poison. A recipe
# not named here (the paper's, safeclip, a candidate given with --extra) is read at the
# default's floor, `floor`.
FLOOR_OF = {
    "robust-eda": "floor-eda",
    "robust-light": "floor-light",
    "robust-d02": "floor-d02",
    "robust-e0": "floor-e0",
    "robust-s8": "floor-s8",
    "robust-s10": "floor-s10",
    "robust-neg": "floor-neg",
    "clip": "clip-clean",
    "scan-filter": "clip-clean",  # the scan benchmark's row: its floor is plain CLIP's
}
# The floors' flags are their recipes', declared once above.
VARIANTS |= {
    floor: VARIANTS[recipe]
    for recipe, floor in {"robust": "floor", **FLOOR_OF}.items()
    if recipe in VARIANTS
}
CLEAN_ONLY = tuple(dict.fromkeys(("floor", *FLOOR_OF.values())))
MAIN = ("clip", "roclip", "robust", "safeclip", "floor")
ABLATIONS = ("aug-only", "match-only", "reference", "every-epoch", "adaptive")
BEYOND = ("robust-eda", "robust-noimg", "robust20")
COLUMNS = (
    ("zero_shot", "zero-shot"),
    ("linear_probe", "probe"),
    ("targeted_asr", "targeted"),
    ("backdoor_asr", "backdoor"),
    ("detection_recall", "detect R"),
    ("risk_precision", "split P"),
    ("risk_recall", "split R"),
    ("purity", "purity"),
    ("worst_drop", "worst drop"),
    ("train_seconds", "train s"),
)

# The split's recall per attack (runs saved from the evening of 2026-12-07 on)
SPLIT_BY_ATTACK = (
    ("risk_recall_targeted", "split R targeted"),
    ("risk_recall_backdoor", "split R backdoor"),
)


@dataclass(frozen=True)
class Cell:
    """One poisoned dataset: a dataset, a seed and a backdoor rate."""

    dataset: str
    seed: int
    rate: float
    trigger: str | None = None  # None: the scale's (blend)

    @property
    def key(self) -> str:
        """File-name key of the cell (the trigger only where it is not the scale's)."""
        tail = f"-{self.trigger}" if self.trigger else ""
        return f"{self.dataset}-s{self.seed}-r{self.rate:g}{tail}"


def label(row: dict[str, Any]) -> str:
    """A row's dataset as the tables name it: with its trigger where it is not the scale's."""
    trigger = row.get("trigger")
    return f"{row['dataset']} ({trigger})" if trigger else row["dataset"]


def parse_extra(items: list[str]) -> dict[str, tuple[dict[str, Any], bool]]:
    """``NAME:field=value,field=value`` -> {NAME: ({field: value}, True)} (values as JSON)."""
    extra = {}
    for item in items:
        name, _, body = item.partition(":")
        flags: dict[str, Any] = {}
        for pair in filter(None, body.split(",")):
            key, _, value = pair.partition("=")
            try:
                flags[key] = json.loads(value)
            except json.JSONDecodeError:
                flags[key] = value
        extra[name] = (flags, True)
    return extra


def variant_flags(base: dict[str, Any], flags: dict[str, Any] | None) -> dict[str, Any] | None:
    """A variant's RoCLIP settings on top of the scale's (reference keeps its own schedule)."""
    if flags is None:
        return None
    if preset_name(flags.get("preset")) != "paper":  # the other presets keep their schedule
        kept = {k: base[k] for k in ("pool_size", "image_aug") if k in base}
        return {**kept, **flags}
    return {**base, **flags}


def plan(args: argparse.Namespace, base: DemoSettings) -> list[tuple[Cell, str]]:
    """Every (cell, variant) of the grid: main variants at every rate, ablations at some."""
    jobs = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for rate in args.rates:
                names = list(args.variants)
                if rate in args.ablation_rates:
                    names += [v for v in args.ablations if v not in names]
                if rate in args.beyond_rates:
                    names += [v for v in args.beyond if v not in names]
                cell = Cell(dataset, seed, rate, args.trigger)
                jobs += [(cell, name) for name in names]
    return jobs


def prepare(cell: Cell, base: DemoSettings, out: Path) -> tuple[DemoSettings, Any]:
    """The cell's captioned dataset (shared by its seeds' rates) and its poisoned copy."""
    s = replace(
        base, dataset=cell.dataset, seed=cell.seed, backdoor_rate=cell.rate, trigger=cell.trigger
    ).resolved()
    data = build_data(s, out / "data" / f"{cell.dataset}-s{cell.seed}", say=_log)
    return s, poison(s, data, out / "poisoned" / cell.key, say=_log)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def spec_for(
    cell: Cell,
    name: str,
    s: DemoSettings,
    poisoned: Any,
    variants: dict,
    out: Path,
    jobs: int,
    grad_clip_norm: float | None = None,
) -> RunSpec:
    flags, defend = variants[name]
    train = s.train_settings(default_threads(jobs) if s.device == "cpu" else None)
    train = replace(train, grad_clip_norm=grad_clip_norm)
    return RunSpec(
        name=name,
        dataset_dir=poisoned.out_dir,
        manifest=poisoned.manifest_path,
        train=train,
        roclip_flags=variant_flags(dict(s.roclip_flags), flags),
        defend=defend,
        run_dir=out / "work" / cell.key / name,
        eval_limit=s.eval_limit,
        eval_seed=cell.seed,
        extra={"dataset": cell.dataset, "seed": cell.seed, "rate": cell.rate}
        | ({"trigger": cell.trigger} if cell.trigger else {}),
        clean_only=name in CLEAN_ONLY,
        resumable=True,  # a run stopped mid-way (session end, crash) continues from its epoch
    )


def row_of(result: dict[str, Any]) -> dict[str, Any]:
    """The table's figures of one run (fractions; None where absent)."""
    final = result["final"]
    targeted = final.get("targeted") or {}
    groups = targeted.get("by_captions") or {}
    backdoor = final.get("backdoor") or {}
    detection = (final.get("detection") or [{}])[-1]
    matching = [m for m in result["matching"].values() if m.get("purity") is not None]
    per_epoch = {int(k): v for k, v in result["per_epoch"].items()}
    drops = [  # any epoch's fall from the epoch before (the goal: none above 5 points)
        per_epoch[e - 1]["zero_shot"] - per_epoch[e]["zero_shot"]
        for e in per_epoch
        if e - 1 in per_epoch
    ]
    return {
        **result["extra"],
        "variant": result["name"],
        "zero_shot": final["zero_shot"]["accuracy"],
        "linear_probe": (final.get("linear_probe") or {}).get("accuracy"),
        "targeted_asr": targeted.get("success_rate"),
        **{f"targeted_{n}": g["success_rate"] for n, g in groups.items()},
        "backdoor_asr": backdoor.get("success_rate"),
        "backdoor_clean_rate": backdoor.get("clean_target_rate"),
        "detection_precision": detection.get("precision"),
        "detection_recall": detection.get("recall"),
        "detection_ap": detection.get("average_precision"),
        "purity": statistics.mean(m["purity"] for m in matching) if matching else None,
        "purity_by_epoch": {e: m.get("purity") for e, m in result["matching"].items()},
        "poison_class": statistics.mean(
            m["poison_class"] for m in matching if m["poison_class"] is not None
        )
        if any(m.get("poison_class") is not None for m in matching)
        else None,
        "worst_drop": max(drops) if drops else None,
        "grad_clip_norm": result.get("settings", {}).get("grad_clip_norm"),
        "risk_precision": _mean_key(result["matching"].values(), "risk_precision"),
        "risk_recall": _mean_key(result["matching"].values(), "risk_recall"),
        **{k: _mean_key(result["matching"].values(), k) for k, _ in SPLIT_BY_ATTACK},
        "risk_recall_by_epoch": {
            e: {k: m.get(k) for k in ("risk_recall", *(k for k, _ in SPLIT_BY_ATTACK))}
            for e, m in result["matching"].items()
        },
        "defended_epochs": saved_defended_epochs(result),
        "zero_shot_by_epoch": {e: v["zero_shot"] for e, v in per_epoch.items()},
        "train_seconds": result["train_seconds"],
        "pairs_per_second": result["pairs_per_second"],
    }


def _mean_key(epochs: Any, key: str) -> float | None:
    """Mean of ``key`` over the epochs that have it (None if none does)."""
    values = [e[key] for e in epochs if e.get(key) is not None]
    return statistics.mean(values) if values else None


def _cell_text(values: list[float], seconds: bool) -> str:
    if not values:
        return "-"
    scale = 1.0 if seconds else 100.0
    fmt = "{:.0f}" if seconds else "{:.1f}"
    mean = fmt.format(scale * statistics.mean(values))
    if len(values) == 1:
        return mean
    return f"{mean} ± {fmt.format(scale * statistics.stdev(values))}"


def columns_for(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The table's columns: targeted success per poisoning strength next to the overall rate."""
    groups = sorted(
        {
            k.removeprefix("targeted_")
            for r in rows
            for k in r
            if k[9:].isdigit() and k.startswith("targeted_")
        },
        key=int,
    )
    per_attack = [c for c in SPLIT_BY_ATTACK if any(r.get(c[0]) is not None for r in rows)]
    out: list[tuple[str, str]] = []
    for key, label in COLUMNS:
        out.append((key, label))
        if key == "targeted_asr":
            out += [(f"targeted_{n}", f"targeted ({n})") for n in groups]
        if key == "risk_recall":  # runs saved before 2026-12-07's evening have no such figure
            out += per_attack
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (dataset, rate, variant), mean ± std over seeds, in percent."""
    columns = columns_for(rows)
    order = {name: i for i, name in enumerate(VARIANTS)}
    keys = sorted(
        {(label(r), r["rate"], r["variant"]) for r in rows},
        key=lambda k: (k[0], k[1], order.get(k[2], len(order)), k[2]),
    )
    header = "| dataset | backdoor | variant | seeds | " + " | ".join(c[1] for c in columns) + " |"
    lines = [header, "|" + " --- |" * (4 + len(columns))]
    for dataset, rate, variant in keys:
        group = [r for r in rows if (label(r), r["rate"], r["variant"]) == (dataset, rate, variant)]
        cells = [
            _cell_text([r[k] for r in group if r.get(k) is not None], k == "train_seconds")
            for k, _ in columns
        ]
        lines.append(
            f"| {dataset} | {100 * rate:g}% | {variant} | {len(group)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def purity_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: matching purity and clean zero-shot in each matching epoch, mean over seeds.

    The main table's purity is a mean over the run; here is when the matched captions began to
    name the image's class, and what each matching epoch did to clean accuracy.
    """
    order = {name: i for i, name in enumerate(VARIANTS)}
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("purity_by_epoch"):
            groups.setdefault((label(r), r["rate"], r["variant"]), []).append(r)
    lines = [
        "| dataset | backdoor | variant | seeds | matching epoch (1-based): purity / zero-shot |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in sorted(groups, key=lambda k: (k[0], k[1], order.get(k[2], len(order)), k[2])):
        group = groups[key]
        epochs = sorted({int(e) for r in group for e in r["purity_by_epoch"]})
        cells = []
        for e in epochs:
            purity = [r["purity_by_epoch"].get(str(e)) for r in group]
            zs = [r["zero_shot_by_epoch"].get(str(e)) for r in group]
            purity = [v for v in purity if v is not None]
            zs = [v for v in zs if v is not None]
            p_text = f"{100 * statistics.mean(purity):.0f}" if purity else "-"
            z_text = f"{100 * statistics.mean(zs):.0f}" if zs else "-"
            cells.append(f"{e}: {p_text} / {z_text}")
        lines.append(
            f"| {key[0]} | {100 * key[1]:g}% | {key[2]} | {len(group)} | " + ", ".join(cells) + " |"
        )
    return "\n".join(lines)


# -- the default decision (issue 21): does the candidate beat the incumbent everywhere? ------------

ASR_KEYS = ("targeted_asr", "backdoor_asr")


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def _seeds(rows: list[dict[str, Any]], variant: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in rows if r["variant"] == variant}


def floor_of(variant: str, rows: list[dict[str, Any]] | None = None) -> str:
    """The clean-rows variant a recipe's attack success is read at (:data:`FLOOR_OF`).

    Given ``rows``, a floor none of them holds gives way to the default's, ``floor``: a recipe
    whose own floor was not run is read where the default is, not at no floor at all.
    """
    own = FLOOR_OF.get(variant, "floor")
    if rows is not None and not any(r["variant"] == own for r in rows):
        return "floor"
    return own


def cell_verdict(
    rows: list[dict[str, Any]], candidate: str, incumbent: str, floor_name: str | None = None
) -> dict[str, Any] | None:
    """One (dataset, rate): means over the seeds both variants ran, each ASR read at its floor.

    A floor is a variant trained without the poisoned rows: an attack success below it is what
    the trigger or target scores when nothing was learned from the poison, so two figures under
    their floors are a tie, not a win (on Fashion-MNIST seed 0 the blended trigger alone turns
    40-50% of the test images into the target class). Each variant is read at its own recipe's
    floor (:func:`floor_of`: the default's where its own was not run in the cell), or both at
    ``floor_name`` where one is given. Zero-shot is compared as measured.
    Returns None where the two variants share no seed.
    """
    cand, inc = _seeds(rows, candidate), _seeds(rows, incumbent)
    seeds = sorted(set(cand) & set(inc))
    if not seeds:
        return None
    names = (floor_name or floor_of(candidate, rows), floor_name or floor_of(incumbent, rows))
    floors = [[r for r in rows if r["variant"] == name] for name in names]
    out: dict[str, Any] = {
        "seeds": seeds,
        "floors": names,
        "floor_seeds": [sorted(r["seed"] for r in floor) for floor in floors],
    }
    wins = []
    for key in ASR_KEYS:
        base_c, base_i = (_mean(floor, key) for floor in floors)
        c = statistics.mean(cand[s][key] for s in seeds)
        i = statistics.mean(inc[s][key] for s in seeds)
        c_read = c if base_c is None else max(c, base_c)
        i_read = i if base_i is None else max(i, base_i)
        out[key] = {"candidate": c, "incumbent": i, "floor": base_c, "incumbent_floor": base_i}
        wins.append(c_read <= i_read)
    zs_c = statistics.mean(cand[s]["zero_shot"] for s in seeds)
    zs_i = statistics.mean(inc[s]["zero_shot"] for s in seeds)
    out["zero_shot"] = {"candidate": zs_c, "incumbent": zs_i}
    wins.append(zs_c >= zs_i)
    out["beats"] = all(wins)
    return out


def _floors_text(floor_names: tuple[str, str]) -> str:
    """One floor's name, or the candidate's and the incumbent's where they differ."""
    c, i = floor_names
    return c if c == i else f"{c}, {i}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def verdict_table(
    rows: list[dict[str, Any]],
    candidate: str = "robust",
    incumbent: str = "roclip",
    floor_name: str | None = None,
) -> tuple[str, bool]:
    """Markdown: the candidate against the incumbent per (dataset, rate), and the verdict.

    The default changes only where the candidate is no worse on every figure in every cell the
    grid holds (issue 21's rule); the table says how many seeds each cell's means hold, and
    which floor each variant's attack success is read at (the header's, or, in a cell that
    lacks a recipe's own floor, the one its seeds column names).
    """
    names = (floor_name or floor_of(candidate, rows), floor_name or floor_of(incumbent, rows))
    floors = _floors_text(names)
    lines = [
        f"| dataset | backdoor | seeds | targeted {candidate} / {incumbent} / {floors} "
        f"| backdoor {candidate} / {incumbent} / {floors} "
        f"| zero-shot {candidate} / {incumbent} "
        f"| {candidate} no worse |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for dataset, rate in sorted({(label(r), r["rate"]) for r in rows}):
        cell = [r for r in rows if (label(r), r["rate"]) == (dataset, rate)]
        v = cell_verdict(cell, candidate, incumbent, floor_name)
        if v is None:
            continue
        verdicts.append(v["beats"])
        same = names[0] == names[1]
        asr = []
        for k in ASR_KEYS:
            f = v[k]
            base = _pct(f["floor"]) + ("" if same else f", {_pct(f['incumbent_floor'])}")
            asr.append(f"{_pct(f['candidate'])} / {_pct(f['incumbent'])} / {base}")
        zs = f"{100 * v['zero_shot']['candidate']:.1f} / {100 * v['zero_shot']['incumbent']:.1f}"
        seeds = ",".join(map(str, v["seeds"]))
        listed = v["floor_seeds"][:1] if same else v["floor_seeds"]
        floor_seeds = "; ".join(",".join(map(str, x)) or "none" for x in listed)
        # a recipe whose own floor this cell lacks is read at the default's: say so here, as
        # the header names the floors the rest of the table is read at
        cell_floors = tuple(v["floors"])
        if cell_floors != names:
            floor_seeds += f" at {_floors_text(cell_floors)}"
        lines.append(
            f"| {dataset} | {100 * rate:g}% | {seeds} (floor {floor_seeds}) | {asr[0]} "
            f"| {asr[1]} | {zs} | {'yes' if v['beats'] else 'no'} |"
        )
    ok = bool(verdicts) and all(verdicts)
    return "\n".join(lines), ok


def device_name(device: str, jobs: int) -> str:
    """The device, and how the runs shared it."""
    runs = f"{jobs} run(s) at a time"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, {runs}"
    cores = os.cpu_count() or 1
    threads = default_threads(jobs) or torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {cores} cores, {runs}, {threads} thread(s) each"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("robustness"), help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0005, 0.001, 0.01])
    parser.add_argument("--variants", nargs="+", default=list(MAIN), help="at every rate")
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS), help="at some rates")
    parser.add_argument("--ablation-rates", nargs="*", type=float, default=[0.001])
    parser.add_argument(
        "--beyond", nargs="*", default=list(BEYOND), help="variants beyond the paper"
    )
    parser.add_argument("--beyond-rates", nargs="*", type=float, default=[0.001, 0.01])
    parser.add_argument("--extra", nargs="*", default=[], help="NAME:field=value,... variants")
    parser.add_argument(
        "--trigger",
        choices=TRIGGER_KINDS,
        help="the backdoor's trigger (default: the scale's, blend); its runs are saved and "
        "tabled apart",
    )
    parser.add_argument("--epochs", type=int, help="(default: the scale's)")
    parser.add_argument(
        "--grad-clip-norm",
        type=float,
        help="clip every run's gradient norm to this (OpenCLIP's --grad-clip-norm; default: no "
        "clipping); a --out folder holds runs of one value",
    )
    parser.add_argument("--jobs", type=int, help="runs at once (default: the scale's)")
    parser.add_argument("--scale", default=None, help="demo scale (default: cpu, or gpu on cuda)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a check of the script")
    parser.add_argument(
        "--report",
        action="store_true",
        help="train nothing: the table of every run saved in --out/runs so far",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("CANDIDATE", "INCUMBENT"),
        help="with --report, also the verdict table of CANDIDATE against INCUMBENT by the "
        "default's rule (repeatable; the default's own table is robust against roclip)",
    )
    parser.add_argument(
        "--floor",
        default=None,
        metavar="VARIANT",
        help="with --report, the clean-rows variant every verdict reads both variants' ASRs at "
        "(default: each variant's own recipe's floor: floor-eda for robust-eda, floor-light "
        "for robust-light, clip-clean for clip and scan-filter, else floor)",
    )
    args = parser.parse_args(argv)
    if args.grad_clip_norm is not None and not args.grad_clip_norm > 0:
        parser.error(f"--grad-clip-norm {args.grad_clip_norm}: give a number > 0")
    return args


def base_settings(args: argparse.Namespace) -> DemoSettings:
    scale = args.scale or ("gpu" if args.device.startswith("cuda") else "cpu")
    base = DemoSettings(scale=scale, device=args.device, jobs=args.jobs, epochs=args.epochs)
    if args.quick:
        args.datasets, args.seeds, args.rates = ["digits"], [0], [0.05]
        args.ablation_rates = args.beyond_rates = [0.05]
        base = replace(
            base, epochs=args.epochs or 2, train_limit=300, test_limit=60, targets=4,
            captions_per_target=[2, 3], batch_size=32, eval_limit=40,
            roclip_flags={"first_defended_epoch": 1, "defend_every": 1, "pool_size": 64},
        )  # fmt: skip
    return base


def require_saved(flag: str, names: list[str], known: set[str], runs: Path) -> None:
    """Refuse a variant a report flag names but no saved run holds, naming the saved ones."""
    missing = [name for name in names if name not in known]
    if missing:
        raise SystemExit(
            f"{flag}: no saved run of {', '.join(missing)} in {runs}; "
            f"saved variants: {', '.join(sorted(known))}"
        )


def report(out: Path, compare: list[list[str]] | None = None, floor_name: str | None = None) -> int:
    """The table of the runs a (possibly unfinished) grid has saved, whatever plan made them.

    A CPU grid takes hours; its runs are saved one by one, so the table can be read at any time,
    and a grid run in several invocations (a phase per priority) still gives one table.
    """
    paths = sorted((out / "runs").glob("*.json"))
    if not paths:
        raise SystemExit(f"--report: no saved runs in {out / 'runs'}; run the grid first")
    rows = [json.loads(path.read_text()) for path in paths]
    # a saved row holds no device or date: the page that quotes the runs says where they ran
    header = f"{len(rows)} saved runs in {out / 'runs'} (device and date of each: docs/results.md)"
    known = {r["variant"] for r in rows}
    if floor_name is not None:  # the recipes' own floors may still be owed: verdicts say so
        require_saved("--floor", [floor_name], known, out / "runs")
    verdict, ok = verdict_table(rows, floor_name=floor_name)
    decision = (
        "robust beats roclip in every cell: it can be the default"
        if ok
        else "robust does not beat roclip in every cell: the default stays"
    )
    extra = []
    for candidate, incumbent in compare or []:
        require_saved("--compare", [candidate, incumbent], known, out / "runs")
        extra.append(
            f"{candidate} against {incumbent}:\n\n"
            + verdict_table(rows, candidate, incumbent, floor_name)[0]
        )
    text = "\n\n".join([table(rows), purity_table(rows), verdict, decision, *extra])
    print(header)
    print(text)
    (out / "report.md").write_text(f"{header}\n\n{text}\n")
    (out / "report.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


def check_one_recipe(store: Path, grad_clip_norm: float | None) -> None:
    """Refuse to add runs of another gradient clipping to a folder's saved runs.

    The table and the verdicts compare every saved run of a cell, so a folder must hold one
    recipe; runs saved before the option existed were not clipped.
    """
    for path in sorted(store.glob("*.json")):
        saved = json.loads(path.read_text()).get("grad_clip_norm")
        if saved != grad_clip_norm:
            raise SystemExit(
                f"--grad-clip-norm {grad_clip_norm}: {path} was trained with "
                f"{saved} (None: no clipping); give its value, or another --out for this recipe"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.compare or args.floor is not None) and not args.report:
        raise SystemExit(
            "--compare and --floor go with --report (they read saved runs, they train nothing)"
        )
    if args.report:
        return report(args.out, args.compare, args.floor)
    base = base_settings(args)
    variants = {**VARIANTS, **parse_extra(args.extra)}
    unknown = sorted(set(args.variants + args.ablations + args.beyond) - set(variants))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(variants)}")
    jobs = int(base.resolved().jobs or 1)
    store = args.out / "runs"
    store.mkdir(parents=True, exist_ok=True)
    check_one_recipe(store, args.grad_clip_norm)
    specs, cached, prepared = [], [], {}
    for cell, name in plan(args, base):
        path = store / f"{cell.key}-{name}.json"
        if path.is_file():
            cached.append(json.loads(path.read_text()))
            continue
        if cell not in prepared:
            prepared[cell] = prepare(cell, base, args.out)
        s, poisoned = prepared[cell]
        spec = spec_for(cell, name, s, poisoned, variants, args.out, jobs, args.grad_clip_norm)
        specs.append((path, spec))
    header = f"device: {device_name(args.device, jobs)}; torch {torch.__version__}; {date.today()}"
    if args.grad_clip_norm is not None:
        header += f"; gradient norm clipped to {args.grad_clip_norm:g}"
    _log(f"{header}; {len(specs)} runs to train, {len(cached)} already done, {jobs} at a time")
    start = time.perf_counter()

    def save(index: int, result: dict[str, Any]) -> None:
        row = row_of(result)
        specs[index][0].write_text(json.dumps(row, indent=1))
        print(json.dumps({k: row[k] for k in row if not k.endswith("_by_epoch")}), flush=True)

    failed = None
    try:
        run_specs([spec for _, spec in specs], jobs, on_result=save)
    except RunsFailed as err:  # the table still shows every run that finished
        failed = err
        _log(f"error: {err}")
    rows = cached + [json.loads(path.read_text()) for path, _ in specs if path.is_file()]
    text = table(rows) + "\n\n" + purity_table(rows)
    print(header)
    print(text)
    command = "python benchmarks/bench_robustness.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    (args.out / "results.md").write_text(f"{header}\n\n`{command}`\n\n{text}\n")
    summary = {"header": header, "command": command, "wall_seconds": time.perf_counter() - start}
    (args.out / "summary.json").write_text(json.dumps({**summary, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
