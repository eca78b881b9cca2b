"""Every GPU figure the project owes, in one prepared command that fits one device call.

A GPU machine is lent for 15 minutes in all (start-up and idle included), one command at most
10 minutes, on a bare image without open_clip_torch and a few of its dependencies. So the
evidence is one command, rehearsed on the CPU first (``--quick``), that runs these parts in
order, each in its own child process under its own time budget:

  0 install       the wheels in ``.whl/`` (``scripts/fetch_gpu_wheels.sh``) into a scratch
                  folder put first on the children's ``PYTHONPATH``
  1 environment   GPU name, driver, torch, open_clip_torch and the carried packages
  2 matching      ``bench_matching --shapes full``: exact search against a bf16 product of the
                  same shape (goal: within 1.3x)
  3 openclip_step ``bench_openclip_step`` ViT-B/32, batch 256, bf16, pool 65,536: plain step vs
                  matching step (fp32 search) vs matching step (bf16 search) (goal: < 1%)
  4 small_gpu     the kit's ``small-gpu`` preset's step speed (no goal: a figure owed)
  5 augment       the batched augmentation of 256 images at 224 px, as a share of part 3's
                  plain step (goal: < 5%)
  6 gpu_tests     the ``gpu``-marked tests (``pytest -m gpu``)
  7 robustness    ``bench_robustness --device cuda`` on the tensor path: captioned MNIST and
                  Fashion-MNIST, CLIP / paper / robust / SafeCLIP / floor, backdoor
                  at 0.1% and 1%; seed 0 first, then as many more seeds (up to 3) as the time
                  left fits; it gets whatever parts 0-6 left, never more than 8 minutes

Why children and budgets: a part that hangs or overruns is killed at its budget (its whole
process group) and recorded as such, and the next part still runs. Why a JSON line per part:
the device call can be cut off at its limit, so each part appends its record to
``evidence.jsonl`` the moment it ends, and ``summary.json`` and ``evidence.md`` are rewritten
after every part; a cut-off run keeps everything it finished. The device returns at most 8
files from ``$OUT``, so ``--out`` receives only those three and ``log.txt`` (every child's
output); the parts' scratch files (datasets, checkpoints, the installed wheels) go to
``--work``, a temporary folder by default.

``--quick`` runs every part at toy size on the CPU (tiny models, small shapes, scikit-learn's
digits, a few steps) so the command is known to work before any GPU time is spent. Its figures
are not evidence and are marked as such everywhere they are written.

    python benchmarks/gpu_evidence.py --out /tmp/evidence --quick     # CPU rehearsal
    python3 benchmarks/gpu_evidence.py --out $OUT                     # on the GPU machine
    python benchmarks/gpu_evidence.py --out /tmp/x --plan             # print the plan only

This file holds the plan, the runners and the command line; ``gpu_evidence_core.py`` (sizes,
budgets, records, children), ``gpu_evidence_digest.py`` (each part's output read into goals)
and ``gpu_evidence_report.py`` (the grid's table, the environment, the summary files) beside it
hold the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from gpu_evidence_core import (
    BENCH,
    DEFAULT_BUDGET_S,
    DEFAULT_DATA,
    DEFAULT_WHEELS,
    GRID_DATASETS,
    GRID_RATES,
    GRID_SEEDS,
    GRID_VARIANTS,
    MIN_PART_S,
    QUICK_BUDGET_S,
    RESERVE_S,
    ROBUSTNESS_CAP_S,
    SIZES,
    Context,
    Goal,
    Part,
    _current,
    _kill_group,
    child_env,
    goal_value,
    run_command,
    verdict,
    wheel_names,
)
from gpu_evidence_digest import (
    digest_augment,
    digest_environment,
    digest_matching,
    digest_small_gpu,
    digest_step,
    digest_tests,
    gpu_test_files,
)
from gpu_evidence_report import collect_rows, environment_report, grid_table, write_summary

# -- parts --------------------------------------------------------------------------------------


def plan(ctx: Context) -> list[Part]:
    """The parts in order, with this mode's sizes and budgets."""
    s = ctx.sizes()
    b = s["budgets"]
    py = sys.executable
    dev = ["--device", ctx.device]

    def bench(script: str, *extra: str, output: str) -> list[str]:
        return [py, str(BENCH / script), *dev, *extra, "--json", str(ctx.work / output)]

    pytest = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    junit = f"--junitxml={ctx.work / 'gpu_tests.xml'}"
    return [
        Part("install", "install the carried wheels", b["install"], runner=run_install),
        Part(
            "environment",
            "environment: GPU, driver, torch, open_clip_torch",
            b["environment"],
            [py, str(Path(__file__).resolve()), "--environment-json", str(ctx.work / "env.json")],
            "env.json",
            digest_environment,
        ),
        Part(
            "matching",
            "exact matching vs a bf16 matmul of the same shape",
            b["matching"],
            bench("bench_matching.py", *s["matching"], output="matching.json"),
            "matching.json",
            digest_matching,
        ),
        Part(
            "openclip_step",
            "OpenCLIP step: plain vs matching (fp32 search) vs matching (bf16 search)",
            b["openclip_step"],
            bench(
                "bench_openclip_step.py",
                *s["openclip_step"],
                *("--matcher-precision", "fp32", "bf16"),
                output="step.json",
            ),
            "step.json",
            digest_step,
        ),
        Part(
            "small_gpu",
            "the small-gpu preset's step speed",
            b["small_gpu"],
            bench(
                "bench_openclip_step.py",
                *s["small_gpu"],
                *("--matcher-precision", "fp32"),
                output="small_gpu.json",
            ),
            "small_gpu.json",
            digest_small_gpu,
        ),
        Part(
            "augment",
            "batched augmentation, share of the ViT-B/32 step",
            b["augment"],
            bench("bench_augment.py", "--batched-only", *s["augment"], output="augment.json"),
            "augment.json",
            digest_augment,
        ),
        Part(
            "gpu_tests",
            "the gpu-marked tests",
            b["gpu_tests"],
            [*pytest, junit, *gpu_test_files()],
            "gpu_tests.xml",
            digest_tests,
        ),
        Part("robustness", "robustness grid on the tensor path", None, runner=run_robustness),
    ]


def planned_seconds(parts: Sequence[Part], budget_s: float) -> tuple[float, float]:
    """(sum of the fixed budgets, the least the robustness grid gets if every part overruns)."""
    fixed = sum(p.budget_s or 0.0 for p in parts)
    rest = budget_s - RESERVE_S - fixed
    return fixed, max(0.0, min(ROBUSTNESS_CAP_S, rest))


def print_plan(ctx: Context, parts: Sequence[Part]) -> None:
    """The plan, with the total, before anything runs."""
    fixed, least = planned_seconds(parts, ctx.budget_s)
    mode = "CPU rehearsal at toy sizes (--quick)" if ctx.quick else f"device {ctx.device}"
    ctx.say(f"plan: {mode}; at most {ctx.budget_s:.0f} s in all ({ctx.budget_s / 60:.1f} min)")
    for i, part in enumerate(parts):
        if part.budget_s is None:
            ctx.say(
                f"  {i} {part.name:14s} what the parts before leave, at least {least:.0f} s, "
                f"at most {min(ROBUSTNESS_CAP_S, ctx.budget_s - RESERVE_S):.0f} s: {part.title}"
            )
        else:
            ctx.say(f"  {i} {part.name:14s} at most {part.budget_s:4.0f} s: {part.title}")
    ctx.say(f"  parts 0-6 at most {fixed:.0f} s together; {RESERVE_S:.0f} s kept for the summary")


def run_part(ctx: Context, part: Part, index: int) -> dict[str, Any]:
    """Run one part within its budget and the overall deadline; return its record."""
    left = ctx.left()
    budget = min(part.budget_s if part.budget_s is not None else ROBUSTNESS_CAP_S, left)
    record: dict[str, Any] = {
        "part": part.name,
        "index": index,
        "title": part.title,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_s": round(budget, 1),
        "quick": ctx.quick,
        "figures": None,
        "goals": [],
    }
    if left < MIN_PART_S:  # the deadline is too near to start anything worth its start-up
        return {**record, "status": "skipped", "seconds": 0.0, "note": "no time left"}
    ctx.log.write(f"\n===== part {index} {part.name}: {part.title} (budget {budget:.0f} s)\n")
    ctx.log.flush()
    if part.runner is not None:
        return {**record, **part.runner(ctx, part, budget)}
    result = run_command(part.argv, budget, ctx.env, ctx.log)
    record.update(
        command=shlex.join(part.argv),
        rc=result.rc,
        seconds=round(result.seconds, 2),
        tail=result.tail[-12:],
    )
    output = ctx.work / part.output
    if result.timed_out:
        record.update(status="timeout", note=f"killed at its budget of {budget:.0f} s")
    elif result.rc != 0:
        record.update(status="failed", note=f"exit code {result.rc}")
    elif not output.is_file():
        record.update(status="failed", note=f"wrote no {part.output}")
    else:
        record["status"] = "ok"
    if output.is_file() and part.digest is not None and record["status"] in ("ok", "failed"):
        try:  # a failed pytest run still wrote its junit file: keep its counts
            figures, goals = part.digest(ctx, output)
            record.update(figures=figures, goals=[g.as_dict() for g in goals])
        except (ValueError, KeyError, TypeError, ET.ParseError) as error:
            record.update(status="failed", note=f"unreadable {part.output}: {error!r}")
    return record


# -- part 0: wheels -----------------------------------------------------------------------------


def run_install(ctx: Context, part: Part, budget: float) -> dict[str, Any]:
    """Install ``.whl/*.whl`` into ``work/site`` (no index, no deps) for the children."""
    wheels = sorted(ctx.wheels.glob("*.whl")) if ctx.wheels.is_dir() else []
    if not wheels:
        ctx.env = child_env(None, ctx.data)
        return {"status": "skipped", "seconds": 0.0, "note": f"no wheels in {ctx.wheels}"}
    names = wheel_names(wheels)
    twice = {n: v for n, v in names.items() if len(v) > 1}
    if twice:  # pip refuses the whole install then: say which, keep going without them
        ctx.env = child_env(None, ctx.data)
        return {"status": "failed", "seconds": 0.0, "note": f"two versions of {twice}"}
    site = ctx.work / "site"
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--upgrade", "--disable-pip-version-check",
            "--target", str(site), *map(str, wheels)]  # fmt: skip
    result = run_command(argv, budget, dict(os.environ), ctx.log)
    ok = result.rc == 0
    ctx.env = child_env(site if ok else None, ctx.data)
    record = {
        "status": "ok" if ok else ("timeout" if result.timed_out else "failed"),
        "rc": result.rc,
        "seconds": round(result.seconds, 2),
        "command": shlex.join(argv),
        "figures": {"wheels": {n: v[0] for n, v in names.items()}, "site": str(site)},
        "tail": result.tail[-12:],
    }
    if not ok:
        record["note"] = "install failed: the children run without the wheels"
    return record


# -- part 7: the robustness grid ----------------------------------------------------------------


def grid_argv(ctx: Context, out: Path, seeds: Sequence[int]) -> list[str]:
    """``bench_robustness`` through its command line (its internals may change in main)."""
    argv = [sys.executable, str(BENCH / "bench_robustness.py"), "--device", ctx.device,
            "--datasets", *GRID_DATASETS, "--seeds", *map(str, seeds),
            "--rates", *map(str, GRID_RATES), "--variants", *GRID_VARIANTS,
            "--ablations", "--ablation-rates", "--jobs", str(ctx.grid_jobs),
            "--out", str(out)]  # fmt: skip
    if ctx.grid_epochs:
        argv += ["--epochs", str(ctx.grid_epochs)]
    if ctx.quick:
        argv.append("--quick")  # digits, one seed, one rate, two epochs: a check of the path
    return argv


def extra_seeds(per_seed_s: float, left_s: float, have: int) -> int:
    """How many more seeds fit in ``left_s`` at the first seed's pace (0 to the rest)."""
    if per_seed_s <= 0:
        return len(GRID_SEEDS) - have
    return max(0, min(len(GRID_SEEDS) - have, int(left_s // (per_seed_s * 1.1))))


def run_robustness(ctx: Context, part: Part, budget: float) -> dict[str, Any]:
    """Seed 0 of every cell first, then as many more seeds as its pace says still fit.

    The benchmark keeps each finished run in ``runs/*.json`` and skips those on a second
    call, so the second stage adds seeds without training seed 0 again, and a stage killed at
    the deadline still leaves every run that finished. Sizing by seeds, not epochs, keeps every
    run the benchmark's own length, so its figures compare with the CPU grid's.
    """
    out = ctx.work / "robustness"
    deadline = time.monotonic() + budget
    env = dict(ctx.env)
    # Several runs share the machine: without this each would start a thread per core for
    # its CPU work (evaluation, the linear probe) and they would crowd each other out.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ctx.grid_jobs)))
    stages: list[dict[str, Any]] = []
    seeds = [GRID_SEEDS[0]]
    status, note = "ok", ""
    start = time.monotonic()
    per_seed = 0.0
    while True:
        argv = grid_argv(ctx, out, seeds)
        left = deadline - time.monotonic()
        result = run_command(argv, left, env, ctx.log)
        stage = {"seeds": list(seeds), "seconds": round(result.seconds, 2), "rc": result.rc,
                 "command": shlex.join(argv), "tail": result.tail[-8:]}  # fmt: skip
        stages.append(stage)
        if result.timed_out:
            status, note = "timeout", f"stopped at the deadline during seeds {seeds}"
            break
        if result.rc != 0:
            status, note = "failed", f"exit code {result.rc} during seeds {seeds}"
            break
        if len(seeds) >= len(GRID_SEEDS):
            break
        if not per_seed:
            per_seed = result.seconds
        more = extra_seeds(per_seed, deadline - time.monotonic(), len(seeds))
        if more == 0:
            note = (
                f"seed 0 took {per_seed:.0f} s; {deadline - time.monotonic():.0f} s left fit no "
                "further seed"
            )
            break
        seeds = list(GRID_SEEDS[: len(seeds) + more])
    rows = collect_rows(out)
    planned = len(GRID_DATASETS) * len(GRID_SEEDS) * len(GRID_RATES) * len(GRID_VARIANTS)
    if ctx.quick:
        planned = len(GRID_VARIANTS)  # the benchmark's --quick: digits, one seed, one rate
    figures = {
        "runs_finished": len(rows),
        "runs_planned": planned,
        "seeds_reached": seeds,
        "stages": stages,
        "jobs": ctx.grid_jobs,
        "rows": rows,
        "table": grid_table(rows),
    }
    results_md = out / "results.md"
    if status == "ok" and results_md.is_file():
        figures["benchmark_results_md"] = results_md.read_text()
    goal = Goal(
        "robustness",
        "the robustness grid (2 datasets x 3 seeds x 2 rates x 5 variants)",
        f"{planned} runs",
        float(len(rows)),
        "runs",
        len(rows) >= planned,
        note or f"{len(rows)} of {planned} runs finished",
    )
    return {
        "status": status,
        "seconds": round(time.monotonic() - start, 2),
        "note": note,
        "figures": figures,
        "goals": [goal.as_dict()],
    }


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="the report's folder (4 files)")
    parser.add_argument("--quick", action="store_true", help="CPU rehearsal at toy sizes")
    parser.add_argument("--budget-s", type=float, help="whole command, seconds (default 510)")
    parser.add_argument("--parts", help="comma-separated subset of the parts, in plan order")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="wheels to install")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="carried IDX files")
    parser.add_argument("--device", help="default: cuda, or cpu with --quick")
    parser.add_argument("--grid-jobs", type=int, help="robustness runs at once (default 5)")
    parser.add_argument("--grid-epochs", type=int, help="robustness epochs (default: its own)")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--environment-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment_json is None and args.out is None:
        parser.error("--out is required")
    return args


def make_context(args: argparse.Namespace, log: TextIO, argv: Sequence[str] | None) -> Context:
    """The run's context from its options."""
    mode = SIZES["quick" if args.quick else "gpu"]
    work = args.work or Path(tempfile.mkdtemp(prefix="roclip-gpu-evidence-"))
    work.mkdir(parents=True, exist_ok=True)
    words = list(sys.argv[1:] if argv is None else argv)
    return Context(
        quick=args.quick,
        device=args.device or mode["device"],
        out=args.out,
        work=work,
        wheels=args.wheels,
        data=args.data,
        grid_jobs=args.grid_jobs or mode["grid_jobs"],
        grid_epochs=args.grid_epochs,
        budget_s=args.budget_s or (QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S),
        log=log,
        env=child_env(None, args.data),
        command="python benchmarks/gpu_evidence.py " + shlex.join(words),
    )


def select(parts: list[Part], names: str | None) -> list[Part]:
    """The parts named in ``--parts`` (install always first when wheels are wanted)."""
    if not names:
        return parts
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - {p.name for p in parts}
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; known: {[p.name for p in parts]}")
    return [p for p in parts if p.name in wanted or p.name == "install"]


def append_line(ctx: Context, record: dict[str, Any]) -> None:
    """One JSON line per part, written and synced at once: a cut-off run keeps it."""
    with open(ctx.out / "evidence.jsonl", "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.environment_json is not None:
        args.environment_json.write_text(json.dumps(environment_report(), indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evidence.jsonl").write_text("")
    with open(args.out / "log.txt", "w", buffering=1) as log:
        ctx = make_context(args, log, argv)
        parts = select(plan(ctx), args.parts)
        print_plan(ctx, parts)
        if args.plan:
            return 0
        ctx.say(f"scratch folder: {ctx.work}")
        return run_all(ctx, parts)


def run_all(ctx: Context, parts: Sequence[Part]) -> int:
    """Every part in order; summary files after each; exit 0 when every part ended well."""

    def on_term(signum: int, frame: Any) -> None:  # the device's limit: end the child too
        for proc in list(_current):
            _kill_group(proc)
        write_summary(ctx, parts)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for index, part in enumerate(parts):
            record = run_part(ctx, part, index)
            ctx.records.append(record)
            append_line(ctx, record)
            write_summary(ctx, parts)
            goals = "; ".join(
                f"{g['goal']}: {goal_value(g)} ({verdict(g)})" for g in record.get("goals") or []
            )
            ctx.say(
                f"part {index} {part.name}: {record['status']} in {record['seconds']:.0f} s"
                + (f" ({record['note']})" if record.get("note") else "")
                + (f"; {goals}" if goals else "")
            )
            if part.name == "environment" and not ctx.quick and ctx.device.startswith("cuda"):
                env = ctx.figures("environment")  # None: it failed; let the parts tell
                if env is not None and not (env.get("cuda") or {}).get("available"):
                    ctx.say("no CUDA device: the evidence needs one (--quick rehearses on a CPU)")
                    return 3
    finally:
        signal.signal(signal.SIGTERM, previous)
    print((ctx.out / "evidence.md").read_text(), flush=True)
    bad = [r["part"] for r in ctx.records if r["status"] not in ("ok", "skipped")]
    ctx.say(f"done in {time.monotonic() - ctx.start:.0f} s; parts not ok: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
