"""gpu_evidence.py's foundations: its sizes and budgets, records, children and the part type.

The constants of every mode, :class:`Goal` and :class:`Context` (one run's settings and
paths), running a child command under a budget with its whole process group killed at the end
(:func:`run_command`), the children's environment, and :class:`Part`. Imported by
``gpu_evidence.py`` and its other helpers, never run itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
DEFAULT_WHEELS = REPO / ".whl"
DEFAULT_DATA = REPO / ".gpu-data"
# One device call is at most 10 minutes; the machine's start-up is outside the command but
# inside the 15 minutes of the session. 8.5 minutes for the command leaves room for the
# transfers and the summary, and about 4 minutes for a partial rerun (--parts).
DEFAULT_BUDGET_S = 510.0
QUICK_BUDGET_S = 1800.0  # caps only: the rehearsal takes about 2 minutes
ROBUSTNESS_CAP_S = 480.0  # "never more than 8 minutes of compute" for the grid
RESERVE_S = 8.0  # kept back at the end for the summary files
MIN_PART_S = 5.0  # a part with less than this left is skipped, not started
KILL_GRACE_S = 5.0
TAIL_LINES = 30
ON_H100_STEP_MS = 77.0  # docs/environment.md: ViT-B/32 batch 256 bf16 step on an H100
MATCHING_GOAL_X = 1.3
STEP_GOAL_PCT = 1.0
AUGMENT_GOAL_PCT = 5.0
GRID_DATASETS = ("mnist", "fashion-mnist")
GRID_SEEDS = (0, 1, 2)
GRID_RATES = (0.001, 0.01)
GRID_VARIANTS = ("clip", "roclip", "robust", "safeclip", "floor")
DATA_ENV = {"ROCLIP_MNIST_DIR": "mnist", "ROCLIP_FASHION_MNIST_DIR": "fashion-mnist"}
OUT_FILES = ("evidence.jsonl", "summary.json", "evidence.md", "log.txt")

# Sizes per mode. "gpu" is what the issue asks for; "quick" is the same code at toy size.
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "device": "cuda",
        "budgets": {  # caps; about 2 minutes together if nothing hangs
            "install": 30,
            "environment": 45,  # first imports compile: the tree travels without __pycache__
            "matching": 75,
            "openclip_step": 75,
            "small_gpu": 40,
            "augment": 30,
            "gpu_tests": 75,
        },
        "matching": ["--shapes", "full", "--repeat", "5"],
        "openclip_step": ["--model", "ViT-B-32", "--batch", "256", "--precision", "bf16",
                          "--pool", "65536", "--steps", "30", "--warmup", "5"],
        "small_gpu": ["--model", "small-gpu", "--batch", "256", "--precision", "bf16",
                      "--pool", "16384", "--steps", "20", "--warmup", "3"],
        "augment": ["--batch", "256", "--size", "224", "--repeat", "20"],
        "grid_jobs": 5,
    },
    "quick": {
        "device": "cpu",
        "budgets": {
            "install": 120,
            "environment": 120,
            "matching": 180,
            "openclip_step": 240,
            "small_gpu": 240,
            "augment": 120,
            "gpu_tests": 240,
        },
        "matching": ["--shapes", "quick", "--repeat", "2"],
        "openclip_step": ["--model", "tiny", "--batch", "16", "--precision", "fp32",
                          "--pool", "1024", "--steps", "2", "--warmup", "1"],
        # tiny-cpu goes through the same kit-preset path as small-gpu, at a CPU's size
        "small_gpu": ["--model", "tiny-cpu", "--batch", "8", "--precision", "fp32",
                      "--pool", "512", "--steps", "1", "--warmup", "1"],
        "augment": ["--batch", "8", "--size", "64", "--repeat", "2"],
        "grid_jobs": 2,
    },
}  # fmt: skip


# -- records ------------------------------------------------------------------------------------


@dataclass
class Goal:
    """One figure read against its goal; ``met`` is None when it was not measured."""

    part: str
    goal: str
    target: str
    value: float | None
    unit: str
    met: bool | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dict(self.__dict__)


def goal_value(goal: dict[str, Any]) -> str:
    """The measured value with its unit; counts without decimals."""
    value = goal.get("value")
    if value is None:
        return "-"
    if goal["unit"] in ("runs", "passed"):
        return f"{value:.0f} {goal['unit']}"
    return f"{value:,.2f} {goal['unit']}"


def verdict(goal: dict[str, Any]) -> str:
    """``met``, ``missed`` or ``not measured``."""
    if goal.get("met") is None:
        return "not measured"
    return "met" if goal["met"] else "missed"


@dataclass
class CommandResult:
    """How one child process ended: exit code (None when killed at its budget), time, tail."""

    rc: int | None
    seconds: float
    timed_out: bool
    tail: list[str]


@dataclass
class Context:
    """What every part needs: the options, the children's environment, the log, the clock."""

    quick: bool
    device: str
    out: Path
    work: Path
    wheels: Path
    data: Path
    grid_jobs: int
    grid_epochs: int | None
    budget_s: float
    log: TextIO
    start: float = field(default_factory=time.monotonic)
    env: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    command: str = ""

    @property
    def deadline(self) -> float:
        """Monotonic time by which every part must be over (the summary's reserve kept)."""
        return self.start + self.budget_s - RESERVE_S

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()

    def sizes(self) -> dict[str, Any]:
        """The sizes of this mode."""
        return SIZES["quick" if self.quick else "gpu"]

    def figures(self, part: str) -> dict[str, Any] | None:
        """Figures of an earlier part that ended well, or None."""
        for record in self.records:
            if record["part"] == part and record["status"] == "ok":
                return record.get("figures")
        return None

    def say(self, message: str) -> None:
        """One line to the console and the log."""
        print(message, flush=True)
        self.log.write(f"[evidence] {message}\n")
        self.log.flush()


# -- running children ---------------------------------------------------------------------------

_current: list[subprocess.Popen[str]] = []


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """End a child and everything it started (its process group): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(
    argv: Sequence[str], timeout_s: float, env: dict[str, str], log: TextIO, cwd: Path = REPO
) -> CommandResult:
    """Run ``argv`` with its output into ``log``; kill its process group at ``timeout_s``.

    The child gets its own process group (not its own session) so that a kill reaches the
    workers it spawns, while the device tool, which ends the command's session when the
    command returns, still ends anything left behind.
    """
    group: dict[str, Any] = (
        {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        **group,
    )
    _current.append(proc)
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc: int | None = proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        rc = None
    finally:
        _current.remove(proc)
    reader.join(timeout=KILL_GRACE_S)
    return CommandResult(rc, time.monotonic() - start, timed_out, list(tail))


def child_env(site: Path | None, data: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The children's environment: carried wheels and the source tree first on the path.

    The GPU image has no install of this project, so the repository root and
    ``integrations/`` go on ``PYTHONPATH``; the wheels' folder goes before them. The dataset
    variables point at ``.gpu-data/`` where the fetch script copied the IDX files and the
    caller has not set them. Hub libraries are told to stay offline: nothing downloads.
    """
    env = dict(os.environ if base is None else base)
    paths = ([str(site)] if site else []) + [str(REPO), str(REPO / "integrations")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    for var, folder in DATA_ENV.items():
        if not env.get(var) and (data / folder).is_dir():
            env[var] = str(data / folder)
    return env


def wheel_names(wheels: Sequence[Path]) -> dict[str, list[str]]:
    """Project name -> versions among wheel files (names normalised as pip does)."""
    found: dict[str, list[str]] = {}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        found.setdefault(name.lower().replace("_", "-").replace(".", "-"), []).append(version)
    return found


# -- parts --------------------------------------------------------------------------------------

Digest = Callable[[Context, Path], tuple[dict[str, Any], list[Goal]]]
Runner = Callable[[Context, "Part", float], dict[str, Any]]


@dataclass
class Part:
    """One part: a child command writing ``output`` (JSON or junit XML), or its own runner.

    ``budget_s`` None means "what remains" (the robustness grid, capped at 8 minutes).
    """

    name: str
    title: str
    budget_s: float | None
    argv: list[str] = field(default_factory=list)
    output: str = ""
    digest: Digest | None = None
    runner: Runner | None = None
