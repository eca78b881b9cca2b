"""gpu_evidence.py's reports: the robustness grid's table, the environment, the summary files.

The grid's rows read back and tabled, the environment report a child prints
(``--environment-json``), and ``summary.json`` and ``evidence.md`` rewritten after every part.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

from gpu_evidence_core import GRID_VARIANTS, Context, Part, goal_value, verdict

# -- part 7: the robustness grid ----------------------------------------------------------------


def collect_rows(out: Path) -> list[dict[str, Any]]:
    """Every finished run's row (``runs/*.json``), without the per-epoch series."""
    rows = []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a file being written when the stage was killed
        rows.append({k: v for k, v in row.items() if not k.endswith("_by_epoch")})
    return rows


def _mean_sd(values: list[float], scale: float, digits: int) -> str:
    if not values:
        return "-"
    mean = f"{scale * statistics.mean(values):.{digits}f}"
    if len(values) == 1:
        return mean
    return f"{mean} ± {scale * statistics.stdev(values):.{digits}f}"


GRID_COLUMNS = (
    ("zero_shot", "zero-shot %", 100.0, 1),
    ("targeted_asr", "targeted ASR %", 100.0, 1),
    ("backdoor_asr", "backdoor ASR %", 100.0, 1),
    ("detection_recall", "detect recall %", 100.0, 1),
    ("train_seconds", "train s", 1.0, 0),
    ("pairs_per_second", "pairs/s", 1.0, 0),
)


def grid_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: mean ± sd over the finished seeds of each (dataset, rate, variant)."""
    if not rows:
        return "(no run finished)"
    order = {v: i for i, v in enumerate(GRID_VARIANTS)}
    keys = sorted(
        {(r.get("dataset"), r.get("rate"), r.get("variant")) for r in rows},
        key=lambda k: (str(k[0]), float(k[1] or 0), order.get(k[2], 99), str(k[2])),
    )
    lines = [
        "| dataset | backdoor | variant | seeds | " + " | ".join(c[1] for c in GRID_COLUMNS) + " |",
        "|" + " --- |" * (4 + len(GRID_COLUMNS)),
    ]
    for key in keys:
        group = [r for r in rows if (r.get("dataset"), r.get("rate"), r.get("variant")) == key]
        cells = [
            _mean_sd([r[c] for r in group if r.get(c) is not None], scale, digits)
            for c, _, scale, digits in GRID_COLUMNS
        ]
        rate = f"{100 * key[1]:g}%" if key[1] is not None else "-"
        lines.append(f"| {key[0]} | {rate} | {key[2]} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- part 1: the environment (runs in a child) --------------------------------------------------


def environment_report() -> dict[str, Any]:
    """Versions, the device, the driver, whether the imports the parts need work, the data."""
    import importlib
    import importlib.metadata as metadata

    info: dict[str, Any] = {
        "date": date.today().isoformat(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    versions = {}
    for dist in ("torch", "torchvision", "open_clip_torch", "timm", "ftfy", "wcwidth",
                 "webdataset", "braceexpand", "numpy", "pytest", "hypothesis", "scikit-learn",
                 "faiss-cpu", "triton"):  # fmt: skip
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    imports = {}
    for module in ("open_clip", "open_clip_train.main", "roclip_plugin", "roclip_openclip",
                   "roclip_torch", "roclip_kit.train.tensor"):  # fmt: skip
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as error:  # any failure to import is the figure itself
            imports[module] = f"{type(error).__name__}: {error}"
    info["imports"] = imports
    import torch

    cuda: dict[str, Any] = {
        "available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    if cuda["available"]:
        props = torch.cuda.get_device_properties(0)
        cuda.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            devices=torch.cuda.device_count(),
        )
    info["cuda"] = cuda
    info["torch"] = torch.__version__
    info["nvidia_smi"] = _nvidia_smi()
    info["device"] = cuda.get("name") or f"{platform.machine()} CPU"
    info["data"] = _data_sources()
    return info


def _nvidia_smi() -> dict[str, str] | str:
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable: {type(error).__name__}"
    first = out.splitlines()[0] if out else ""
    return dict(zip(fields.split(","), (v.strip() for v in first.split(",")), strict=False))


def _data_sources() -> dict[str, str]:
    """Where the kit finds MNIST and Fashion-MNIST (or why not)."""
    found = {}
    try:
        from roclip_kit.data.datasets import find_fashion_mnist, find_mnist
    except ImportError as error:
        return {"error": repr(error)}
    for name, finder in (("mnist", find_mnist), ("fashion-mnist", find_fashion_mnist)):
        try:
            found[name] = str(finder()["train_images"].parent)
        except (ValueError, KeyError) as error:
            found[name] = f"missing: {error}"
    return found


# -- the summary files --------------------------------------------------------------------------


def header(ctx: Context) -> dict[str, Any]:
    """Device, date, mode and command: heads every file."""
    env = ctx.figures("environment") or {}
    return {
        "evidence": not ctx.quick,
        "mode": "rehearsal (--quick, CPU, toy sizes): NOT evidence" if ctx.quick else "evidence",
        "date": date.today().isoformat(),
        "device": env.get("device", "unknown (environment part did not end well)"),
        "driver": (env.get("nvidia_smi") or {}).get("driver_version")
        if isinstance(env.get("nvidia_smi"), dict)
        else None,
        "torch": env.get("torch"),
        "open_clip_torch": (env.get("versions") or {}).get("open_clip_torch"),
        "command": ctx.command,
        "budget_s": ctx.budget_s,
        "elapsed_s": round(time.monotonic() - ctx.start, 1),
    }


def write_summary(ctx: Context, parts: Sequence[Part]) -> None:
    """summary.json and evidence.md from the records so far (rewritten after every part)."""
    head = header(ctx)
    goals = [g for r in ctx.records for g in r.get("goals") or []]
    done = {r["part"] for r in ctx.records}
    summary = {
        **head,
        "parts": [
            {k: r.get(k) for k in ("part", "status", "seconds", "budget_s", "note")}
            for r in ctx.records
        ],
        "not_run": [p.name for p in parts if p.name not in done],
        "goals": goals,
        "records": ctx.records,
    }
    _atomic_write(ctx.out / "summary.json", json.dumps(summary, indent=1, default=str))
    _atomic_write(ctx.out / "evidence.md", markdown(ctx, head, goals, parts))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(ctx: Context, head: dict[str, Any], goals: list[dict], parts: Sequence[Part]) -> str:
    """The human-readable report: goals, parts, then each part's table."""
    title = "GPU evidence" if head["evidence"] else "GPU evidence: REHEARSAL, NOT EVIDENCE"
    lines = [f"# {title}", ""]
    if not head["evidence"]:
        lines += ["CPU rehearsal at toy sizes (`--quick`): it shows the command works; no figure "
                  "below is a GPU figure.", ""]  # fmt: skip
    lines += [
        f"- device: {head['device']}; driver {head['driver'] or '-'}; torch {head['torch']}; "
        f"open_clip_torch {head['open_clip_torch']}",
        f"- date: {head['date']}; elapsed {head['elapsed_s']:.0f} s of a {head['budget_s']:.0f} s "
        "budget",
        f"- command: `{head['command']}`",
        "",
        "## Goals",
        "",
        "| goal | target | measured | verdict | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for g in goals:
        lines.append(
            f"| {g['goal']} | {g['target']} | {goal_value(g)} | {verdict(g)} | {g['note']} |"
        )
    lines += ["", "## Parts", "", "| # | part | status | seconds | budget s | note |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    done = {r["part"]: r for r in ctx.records}
    for i, part in enumerate(parts):
        r = done.get(part.name)
        if r is None:
            lines.append(f"| {i} | {part.name} | not run | - | - | |")
            continue
        lines.append(
            f"| {i} | {part.name} | {r['status']} | {_fmt(r.get('seconds'), 1)} | "
            f"{_fmt(r.get('budget_s'), 0)} | {r.get('note', '')} |"
        )
    lines += _part_tables(ctx)
    return "\n".join(lines) + "\n"


def _part_tables(ctx: Context) -> list[str]:
    lines: list[str] = []
    m = ctx.figures("matching")
    if m:
        lines += ["", f"## Matching ({m['shapes']} shapes, median of {m['repeat']})", "",
                  "| batch x pool x dim | bf16 matmul ms | fp32 matmul ms | exact fp32 ms (x) | "
                  "bf16 + re-score ms (x) | enqueue ms | step overhead ms |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in m["rows"]:
            lines.append(
                f"| {r['batch']:,} x {r['pool']:,} x {r['dim']:,} | {r['bf16_matmul_ms']:.3f} | "
                f"{r['fp32_matmul_ms']:.3f} | {r['match_fp32_ms']:.3f} "
                f"({r['match_fp32_vs_bf16_matmul']:.2f}x) | {r['match_bf16_ms']:.3f} "
                f"({r['match_bf16_vs_bf16_matmul']:.2f}x) | {r['enqueue_ms']:.3f} | "
                f"{r['overhead_ms']:.3f} |"
            )
    for name, label in (("openclip_step", "OpenCLIP step"), ("small_gpu", "small-gpu preset")):
        s = ctx.figures(name)
        if not s:
            continue
        lines += ["", f"## {label}: {s['model']}, batch {s['batch']}, {s['precision']}, pool "
                  f"{s['pool']:,}, {s['steps']} steps of each kind", "",
                  "| step | median ms | min ms | max ms | pairs/s | overhead ms | overhead % |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for kind, f in s["kinds"].items():
            lines.append(
                f"| {kind} | {f['median_ms']:.2f} | {f['min_ms']:.2f} | {f['max_ms']:.2f} | "
                f"{f['pairs_per_s']:,.0f} | {_fmt(f.get('overhead_ms'))} | "
                f"{_fmt(f.get('overhead_pct'))} |"
            )
        lines.append(f"\nSpread of the plain step (first vs second half): "
                     f"{s['clip_spread_ms']:.2f} ms.")  # fmt: skip
    a = ctx.figures("augment")
    if a:
        b = a["batched"]
        lines += ["", "## Batched augmentation", "",
                  f"{b['batch']} images at {b['size']} px on {a['device']}: {b['ms']:.2f} ms; "
                  f"share of the plain step: {_fmt(a.get('share_of_step_pct'))} %."]  # fmt: skip
    t = next((r for r in ctx.records if r["part"] == "gpu_tests" and r.get("figures")), None)
    if t:
        f = t["figures"]
        lines += ["", "## gpu-marked tests", "",
                  f"{f['passed']} passed, {f['failed']} failed, {f['errors']} errors, "
                  f"{f['skipped']} skipped of {f['tests']}."]  # fmt: skip
        lines += [f"- failed: `{name}`" for name in f["failed_tests"]]
    g = next((r for r in ctx.records if r["part"] == "robustness" and r.get("figures")), None)
    if g:
        f = g["figures"]
        lines += ["", f"## Robustness grid: {f['runs_finished']} of {f['runs_planned']} runs, "
                  f"{f['jobs']} at a time", "", f["table"]]  # fmt: skip
    return lines
