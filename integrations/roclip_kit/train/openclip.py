"""Train CLIP or RoCLIP on a captioned dataset directory through the real OpenCLIP adapter.

The kit's demo and the GPU robustness benchmark call :func:`train_openclip` so that every
figure they report comes from OpenCLIP's own training script (``roclip-openclip-train``), not
from a re-implementation. A run is fully described by :class:`TrainSettings`; its files are
listed in the returned :class:`TrainResult`.

**Subprocess, not in-process** (measured 2026-11-30 on the 2-core CPU machine). Each run is
``python -m roclip_openclip ...`` in a child process. Calling the adapter's ``main`` in-process
gives the same weights (tested: in-process and child runs are identical, and so are two
in-process runs, since OpenCLIP reseeds at start-up) and saves the child's start-up: the same
1,024-pair epoch took 3.3-4.2 s in-process with warm imports and 12.5 s in a child, so about
8.5 s per run (imports, model build, first step), under 2% of a demo run and nothing on a GPU.
In-process is not isolated, though: OpenCLIP's ``setup_logging`` adds two root handlers per run
and never removes them (after three runs the first run's ``out.log`` held 559 lines, 169 of them
its own, and every console line was printed three times), and it sets every logger of the
caller to INFO. A crash or a CUDA error would also stay in the caller's process, with its
memory. So the harness pays the start-up for clean logs, a clean caller and a run that can be
killed at a time-out.

**on_epoch** is called after the child exits successfully, once per saved epoch in epoch order:
OpenCLIP writes ``epoch_N.pt`` in place (not atomically), so a checkpoint is only known to be
complete once the run is over, and on two cores evaluating while training would only slow both.

Layout of a run (``out_dir/name``)::

    model/open_clip_config.json   the preset, loadable as ``local-dir:<run_dir>/model``
    console.log                   the child's stdout and stderr (tracebacks land here)
    out.log, params.txt           OpenCLIP's own log and arguments
    checkpoints/epoch_N.pt        OpenCLIP checkpoints, every epoch
    checkpoints/epoch_N.roclip    RoCLIP state (pool, schedule, RNG) beside each checkpoint
    checkpoints/suspicious_epoch_N.csv   after each matching epoch (RoCLIP runs)
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roclip_kit.files import CAPTION_KEY, CSV_SEPARATOR, IMAGE_KEY, TRAIN_CSV
from roclip_plugin.stats import SUSPICIOUS_PATTERN

_VOCAB = 49408  # OpenCLIP's bundled tokenizer, which works offline

PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo (chosen by measurement, docs/kit-training.md): 32x32 RGB as a 4x4 grid of
    # 8-pixel patches, 3+3 layers, 20-token captions. ~290 pairs/s at batch 128 on 2 cores;
    # 91% zero-shot on captioned MNIST after 4 epochs of 6,000 pairs.
    "tiny-cpu": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "patch_size": 8},
        "text_cfg": {
            "context_length": 20,
            "vocab_size": _VOCAB,
            "width": 128,
            "heads": 2,
            "layers": 3,
        },
    },
    # GPU benchmark on 32x32 MNIST-like data: 8x8 grid of 4-pixel patches.
    "small-gpu": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 32, "layers": 6, "width": 384, "patch_size": 4},
        "text_cfg": {
            "context_length": 32,
            "vocab_size": _VOCAB,
            "width": 256,
            "heads": 4,
            "layers": 6,
        },
    },
}

MODEL_DIR = "model"
CONSOLE_LOG = "console.log"
CONFIG_FILE = "open_clip_config.json"
LOCAL_DIR = "local-dir:"
DEVICES = ("cpu", "cuda")
CPU_PRECISIONS = ("fp32", "amp_bf16", "bf16", "pure_bf16")
TAIL_LINES = 25
_TORCH_INFO = re.compile(r"I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ torch/")
_EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")
# Flags the harness sets itself; passing them in ``extra_args`` would silently override it.
MANAGED_FLAGS = frozenset(
    {
        "--train-data", "--dataset-type", "--csv-img-key", "--csv-caption-key",
        "--csv-separator", "--model", "--device", "--precision", "--batch-size", "--epochs",
        "--lr", "--warmup", "--wd", "--seed", "--workers", "--logs", "--name",
        "--save-frequency", "--roclip",
    }
)  # fmt: skip
OnEpoch = Callable[[int, Path], None]
OnOutput = Callable[[str], None]


@dataclass
class TrainSettings:
    """One training run: data, model preset, optimisation, device, and RoCLIP or not.

    Give ``dataset_dir`` (its ``train.csv`` is used) or ``train_csv``. ``roclip_flags`` maps
    :class:`~roclip_plugin.RoClipConfig` field names (plus ``preset``) to values, each passed
    as ``--roclip-<name>``; they are validated before the run starts. ``precision`` defaults to
    fp32 on the CPU (OpenCLIP's float16 default is ~40x slower there) and amp_bf16 on CUDA.
    ``workers`` defaults to 0 on the CPU (loading in the training process; measured fastest on
    two cores) and 4 on CUDA. ``timeout_s`` kills a run that takes longer.
    """

    out_dir: Path | str
    name: str
    dataset_dir: Path | str | None = None
    train_csv: Path | str | None = None
    roclip: bool = False
    roclip_flags: dict[str, Any] = field(default_factory=dict)
    preset: str | Mapping[str, Any] = "tiny-cpu"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 10
    wd: float = 0.1
    seed: int = 0
    device: str = "cpu"
    precision: str | None = None
    workers: int | None = None
    extra_args: Sequence[str] = ()
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.dataset_dir = None if self.dataset_dir is None else Path(self.dataset_dir)
        self.train_csv = None if self.train_csv is None else Path(self.train_csv)
        self.extra_args = tuple(self.extra_args)
        _check_settings(self)

    @property
    def run_dir(self) -> Path:
        """Where OpenCLIP writes this run (``--logs out_dir --name name``)."""
        return Path(self.out_dir) / self.name

    @property
    def data_csv(self) -> Path:
        """The training CSV: ``train_csv``, or ``train.csv`` of ``dataset_dir``."""
        if self.train_csv is not None:
            return Path(self.train_csv)
        return Path(str(self.dataset_dir)) / TRAIN_CSV

    @property
    def resolved_precision(self) -> str:
        """``precision``, or the device's default."""
        if self.precision is not None:
            return self.precision
        return "fp32" if self.device == "cpu" else "amp_bf16"

    @property
    def resolved_workers(self) -> int:
        """``workers``, or the device's default."""
        if self.workers is not None:
            return self.workers
        return 0 if self.device == "cpu" else 4


@dataclass
class TrainResult:
    """What a finished run left on disk, by 1-based epoch (``epoch_1.pt`` is after epoch 1)."""

    run_dir: Path
    model_name: str
    checkpoints: dict[int, Path]
    roclip_states: dict[int, Path]
    suspicious: dict[int, Path]
    wall_seconds: float
    exit_code: int
    log_path: Path
    console_path: Path
    argv: list[str]

    @property
    def final_checkpoint(self) -> Path:
        """The checkpoint of the last epoch."""
        return self.checkpoints[max(self.checkpoints)]


# -- validation ---------------------------------------------------------------------------


def _check_settings(s: TrainSettings) -> None:
    """Refuse bad settings before anything is written or launched."""
    if (s.dataset_dir is None) == (s.train_csv is None):
        raise ValueError("TrainSettings: give exactly one of dataset_dir and train_csv")
    if not s.name or s.name != Path(s.name).name or s.name in (".", ".."):
        raise ValueError(f"TrainSettings.name: {s.name!r} must be a plain directory name")
    for key in ("epochs", "batch_size"):
        _check_int(key, getattr(s, key), low=1)
    for key in ("warmup", "seed"):
        _check_int(key, getattr(s, key), low=0)
    if s.workers is not None:
        _check_int("workers", s.workers, low=0)
    if not s.lr > 0 or not s.wd >= 0:
        raise ValueError(f"TrainSettings: lr must be > 0 and wd >= 0 (got {s.lr}, {s.wd})")
    if s.device.split(":")[0] not in DEVICES:
        raise ValueError(f"TrainSettings.device: {s.device!r}; allowed: cpu, cuda, cuda:N")
    if s.device == "cpu" and s.resolved_precision not in CPU_PRECISIONS:
        raise ValueError(
            f"TrainSettings.precision: {s.precision!r} on the CPU runs float16, about 40x "
            f"slower than fp32; use one of {', '.join(CPU_PRECISIONS)}"
        )
    if s.timeout_s is not None and not s.timeout_s > 0:
        raise ValueError(f"TrainSettings.timeout_s: {s.timeout_s!r} must be > 0 or None")
    clash = sorted({a.split("=")[0] for a in s.extra_args} & MANAGED_FLAGS)
    if clash or any(a.startswith("--roclip-") for a in s.extra_args):
        raise ValueError(
            f"TrainSettings.extra_args: {clash or 'a --roclip-* flag'} is set by the harness; "
            "use the matching TrainSettings field (roclip_flags for --roclip-*)"
        )
    if s.roclip_flags and not s.roclip:
        raise ValueError("TrainSettings.roclip_flags given with roclip=False; set roclip=True")
    model_config(s.preset)
    roclip_args(s.roclip_flags)


def _check_int(key: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"TrainSettings.{key}: {value!r} must be an integer >= {low}")


def check_train_csv(path: Path) -> None:
    """Fail early, with the fix, on a missing CSV or one without OpenCLIP's two columns."""
    if not path.is_file():
        raise FileNotFoundError(f"training CSV not found: {path} (build it with roclip_kit)")
    with path.open(encoding="utf-8") as fh:
        header = fh.readline().rstrip("\r\n").split(CSV_SEPARATOR)
    missing = [key for key in (IMAGE_KEY, CAPTION_KEY) if key not in header]
    if missing:
        raise ValueError(
            f"{path}: header {header} lacks column(s) {missing}; expected a tab-separated "
            f"CSV with columns {IMAGE_KEY}, {CAPTION_KEY}, label (see roclip_kit.files)"
        )


# -- model presets ------------------------------------------------------------------------


def model_config(preset: str | Mapping[str, Any]) -> dict[str, Any]:
    """The OpenCLIP ``model_cfg`` of a preset name, or a ``model_cfg`` mapping given as is."""
    if isinstance(preset, Mapping):
        if "vision_cfg" not in preset or "text_cfg" not in preset:
            raise ValueError("a custom preset is an OpenCLIP model_cfg with vision_cfg, text_cfg")
        return json.loads(json.dumps(preset))
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[preset]))


def write_model_config(preset: str | Mapping[str, Any], directory: Path) -> str:
    """Write ``open_clip_config.json`` into ``directory``; return the model name to load it."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"model_cfg": model_config(preset)}, indent=2)
    (directory / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
    return LOCAL_DIR + str(directory.resolve())


# -- command line -------------------------------------------------------------------------


def roclip_args(flags: Mapping[str, Any]) -> list[str]:
    """``{"defend_every": 1}`` -> ``["--roclip-defend-every", "1"]``, validated by RoCLIP."""
    from roclip_plugin.config import RoClipConfig, flag_name
    from roclip_plugin.config_aliases import renamed_keys

    options = dict(flags)
    preset = options.pop("preset", "default")
    options = renamed_keys(options)  # old names warn here, once; the flags below are the new ones
    RoClipConfig.from_preset(preset, **options)  # raises ValueError naming the bad field
    argv = [flag_name("preset"), str(preset)] if "preset" in flags else []
    for key, value in options.items():
        argv += [flag_name(key), "none" if value is None else str(value)]
    return argv


def openclip_argv(settings: TrainSettings, model_name: str) -> list[str]:
    """The ``roclip-openclip-train`` arguments of a run."""
    s = settings
    argv = [
        "--train-data", str(s.data_csv.resolve()), "--dataset-type", "csv",
        "--csv-img-key", IMAGE_KEY, "--csv-caption-key", CAPTION_KEY,
        "--csv-separator", CSV_SEPARATOR, "--model", model_name,
        "--device", s.device, "--precision", s.resolved_precision,
        "--batch-size", str(s.batch_size), "--epochs", str(s.epochs),
        "--lr", str(s.lr), "--warmup", str(s.warmup), "--wd", str(s.wd),
        "--seed", str(s.seed), "--workers", str(s.resolved_workers),
        "--logs", str(Path(s.out_dir).resolve()), "--name", s.name, "--save-frequency", "1",
    ]  # fmt: skip
    if s.roclip:
        argv += ["--roclip", *roclip_args(s.roclip_flags)]
    return argv + list(s.extra_args)


# -- running ------------------------------------------------------------------------------


def train_openclip(
    settings: TrainSettings,
    *,
    on_epoch: OnEpoch | None = None,
    on_output: OnOutput | None = None,
) -> TrainResult:
    """Run one OpenCLIP training (RoCLIP if ``settings.roclip``) in a child process.

    ``on_output(line)`` receives each console line while the run is going (for progress);
    ``on_epoch(epoch, checkpoint)`` is called after a successful run for each saved epoch, in
    order. Raises ``RuntimeError`` quoting the end of ``console.log`` when OpenCLIP fails or
    the run exceeds ``settings.timeout_s``.
    """
    check_train_csv(settings.data_csv)
    run_dir = settings.run_dir
    if (run_dir / "out.log").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run (out.log); choose another name or delete it"
        )
    model_name = write_model_config(settings.preset, run_dir / MODEL_DIR)
    argv = openclip_argv(settings, model_name)
    console = run_dir / CONSOLE_LOG
    start = time.perf_counter()
    code = _run_child(argv, console, settings.timeout_s, on_output)
    wall = time.perf_counter() - start
    if code != 0:
        why = f"timed out after {settings.timeout_s} s" if code is None else f"exit code {code}"
        raise RuntimeError(
            f"OpenCLIP training {settings.name!r} failed ({why}); "
            f"last lines of {console}:\n{_tail(console)}"
        )
    result = _collect(settings, model_name, argv, wall, code)
    if not result.checkpoints:
        raise RuntimeError(f"OpenCLIP run {settings.name!r} saved no checkpoint in {run_dir}")
    if on_epoch is not None:
        for epoch, path in result.checkpoints.items():
            on_epoch(epoch, path)
    return result


def _child_env() -> dict[str, str]:
    """The caller's environment, with the packages it imported importable in the child too."""
    import roclip_openclip

    import roclip_plugin

    roots = [str(Path(m.__file__).resolve().parents[1]) for m in (roclip_openclip, roclip_plugin)]
    env = dict(os.environ)
    paths = [*dict.fromkeys(roots), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_child(
    argv: list[str], console: Path, timeout_s: float | None, on_output: OnOutput | None
) -> int | None:
    """Run the adapter, copying its output to ``console`` and ``on_output``.

    Returns its exit code, or None when it was killed at the time-out.
    """
    cmd = [sys.executable, "-m", "roclip_openclip", *argv]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with console.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env()
        )
        try:
            lines = _reader(proc)
            while (line := _next_line(lines, deadline)) is not None:
                log.write(line)
                if on_output is not None:
                    on_output(line.rstrip("\n"))
            if deadline is not None and time.monotonic() >= deadline:
                log.write(f"roclip_kit.train.openclip: killed at the {timeout_s} s time-out\n")
                return None
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _reader(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Lines of the child's output on a queue (None at the end), read by a daemon thread."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_line(lines: queue.Queue[str | None], deadline: float | None) -> str | None:
    """The next output line, or None at the end of the output or at the deadline."""
    while True:
        wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if wait <= 0:
            return None
        try:
            return lines.get(timeout=wait)
        except queue.Empty:
            continue


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The end of a console log for an error message: the exception first, then the tail.

    torch's exit-time INFO lines (OpenCLIP sets every logger to INFO) are left out: they would
    push the traceback out of the tail.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f"(could not read {path}: {err})"
    kept = [line for line in text.splitlines() if not _TORCH_INFO.match(line)]
    errors = [line for line in kept if _EXCEPTION.match(line)]
    head = f"error: {errors[-1]}\n" if errors else ""
    return head + "\n".join(kept[-lines:])


def _by_epoch(folder: Path, pattern: str) -> dict[int, Path]:
    """Files of ``folder`` whose name matches ``pattern`` (one group: the epoch), by epoch."""
    regex = re.compile(pattern)
    found = {}
    for path in folder.glob("*") if folder.is_dir() else []:
        match = regex.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _collect(
    settings: TrainSettings, model_name: str, argv: list[str], wall: float, code: int
) -> TrainResult:
    folder = settings.run_dir / "checkpoints"
    return TrainResult(
        run_dir=settings.run_dir,
        model_name=model_name,
        checkpoints=_by_epoch(folder, r"epoch_(\d+)\.pt"),
        roclip_states=_by_epoch(folder, r"epoch_(\d+)\.roclip"),
        suspicious=_by_epoch(folder, SUSPICIOUS_PATTERN.pattern),
        wall_seconds=wall,
        exit_code=code,
        log_path=settings.run_dir / "out.log",
        console_path=settings.run_dir / CONSOLE_LOG,
        argv=argv,
    )


# -- loading back -------------------------------------------------------------------------


def load_checkpoint(
    model_name: str, checkpoint: Path | str, *, device: str = "cpu"
) -> tuple[Any, Any, Any]:
    """(model in eval mode, evaluation transform, tokenizer) of a saved epoch.

    ``local-dir:`` models ignore OpenCLIP's ``pretrained`` argument, so the weights are loaded
    into the freshly built model instead.
    """
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
    open_clip.load_checkpoint(model, str(checkpoint), device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)
