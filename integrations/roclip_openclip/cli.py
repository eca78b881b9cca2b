"""``roclip-openclip-train``: OpenCLIP's training script plus ``--roclip``.

Accepts every flag of ``python -m open_clip_train.main`` plus ``--roclip`` and the
``--roclip-*`` flags (one per :class:`~roclip_plugin.RoClipConfig` field). Without ``--roclip``
it runs OpenCLIP untouched. Options RoCLIP cannot honour stop the run before training starts.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Sequence
from typing import Any

import pluggy

from roclip_plugin import RoClipConfig, get_plugin_manager
from roclip_plugin.augment import build_policy
from roclip_plugin.config import FLAG_PREFIX, add_argparse_args, config_from_namespace
from roclip_plugin.io import StateError, detach_stdout, load_versioned
from roclip_plugin.validation import check_parsed

SUPPORTED = ((2, 26), (4, 0))  # open_clip_torch versions: [2.26, 4.0)
log = logging.getLogger("roclip")


class UsageError(Exception):
    """A flag combination RoCLIP cannot run; the message says which and what to do."""


def openclip_version() -> tuple[int, int]:
    """(major, minor) of the installed ``open_clip_torch``."""
    try:
        text = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError as err:
        raise UsageError(
            "open_clip_torch is not installed: pip install 'roclip-plugin[openclip]'"
        ) from err
    major, minor = (
        int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2]
    )
    return major, minor


def check_version() -> None:
    """Refuse open_clip_torch versions whose training script the patches were not built for."""
    version = openclip_version()
    low, high = SUPPORTED
    if not low <= version < high:
        raise UsageError(
            f"open_clip_torch {version[0]}.{version[1]} is not supported by "
            f"roclip-openclip-train (supported: {low[0]}.{low[1]} to <{high[0]}.{high[1]}); "
            "install a supported release, e.g. pip install 'open_clip_torch>=2.26,<4'"
        )


def build_parser(pm: pluggy.PluginManager) -> argparse.ArgumentParser:
    """The RoCLIP part of the command line (OpenCLIP's own parser handles the rest)."""
    parser = argparse.ArgumentParser(add_help=False, prog="roclip-openclip-train")
    group = parser.add_argument_group("RoCLIP (roclip-plugin)")
    group.add_argument(
        "--roclip",
        action="store_true",
        help="Train with the RoCLIP defense (without it: plain OpenCLIP).",
    )
    add_argparse_args(group)
    pm.hook.roclip_add_options(parser=group)
    return parser


def check_openclip_args(args: Any) -> None:
    """Stop before training on options RoCLIP cannot honour."""
    problems = []
    if getattr(args, "distill_model", None):
        problems.append("--distill-model: distillation adds a second loss RoCLIP does not handle")
    if "coca" in str(args.model).lower():
        problems.append(f"--model {args.model}: CoCa's captioning loss is not supported")
    if getattr(args, "siglip", False):
        problems.append("--siglip: RoCLIP implements the softmax CLIP loss only")
    if args.accum_freq > 1:
        problems.append(
            f"--accum-freq {args.accum_freq}: the loss runs on cached features several times "
            "per step, which would enqueue captions and match more than once; use --accum-freq 1"
        )
    if getattr(args, "horovod", False):
        problems.append("--horovod: use torchrun/SLURM with torch.distributed instead")
    if not args.train_data and args.dataset_type != "synthetic":
        problems.append("--roclip needs training data (--train-data)")
    if problems:
        raise UsageError("RoCLIP cannot run with: " + "; ".join(problems))


def warn_cpu_precision(args: Any) -> None:
    """Say once, with the fix, that float16 autocast on a CPU is catastrophically slow."""
    device = str(getattr(args, "device", "cuda"))
    cpu = device.startswith("cpu") or not _cuda_available()
    if cpu and args.precision in ("amp", "amp_fp16", "fp16", "pure_fp16"):
        message = (
            f"--precision {args.precision} runs float16 on the CPU, about 40x slower than fp32 "
            "on CPUs without native float16 (measured: RN50 batch 4, 157 s vs 4 s per step); "
            "pass --precision fp32 (or amp_bf16)"
        )
        log.warning(message)
        print(f"roclip-openclip-train: warning: {message}", file=sys.stderr)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _print_help(parser: argparse.ArgumentParser) -> int:
    from open_clip_train.params import parse_args

    try:
        parse_args(["--help"])
    except SystemExit:
        pass
    print()
    parser.print_help()
    return 0


def check_resume_state(args: Any, config: RoClipConfig) -> None:
    """Refuse, before training, a ``--resume`` whose RoCLIP state file cannot be restored.

    The state file sits beside the checkpoint (``epoch_3.pt`` -> ``epoch_3.roclip``); an
    empty, truncated or foreign file, a state with entries missing, or a pool of another
    ``--roclip-pool-size`` would otherwise end in a traceback after the model and data were
    built. ``--resume latest`` is resolved by OpenCLIP itself, so its file is checked when it
    is loaded (a :class:`~roclip_plugin.io.StateError` that :func:`main` reports the same way).
    """
    from roclip_openclip.patches import STATE_FORMAT, state_path_for
    from roclip_plugin.defense import STATE_VERSION
    from roclip_plugin.pool import check_pool_state
    from roclip_plugin.validation import check_defense_state, check_state_keys

    resume = getattr(args, "resume", None)
    if not resume or resume == "latest":
        return
    state_path = state_path_for(resume)
    if not state_path.is_file():
        return  # a checkpoint trained without --roclip: the patches say so and start empty
    try:
        saved = load_versioned(state_path, STATE_FORMAT, "roclip-openclip state file")
        check_state_keys(saved, ("roclip", "rng"), f"roclip-openclip state file {state_path}")
        state = check_defense_state(saved["roclip"], STATE_VERSION)
        check_pool_state(state["pool"], config.pool_size)
    except StateError as err:
        raise UsageError(f"--resume {resume}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run OpenCLIP's training (with RoCLIP when ``--roclip`` is given); returns an exit code.

    Refusals exit 2 with one line on stderr; a closed pipe (``--help | head``) ends quietly.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except UsageError as err:
        print(f"roclip-openclip-train: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        detach_stdout()
        return 141


def _main(argv: list[str]) -> int:
    check_version()
    pm = get_plugin_manager()
    parser = build_parser(pm)
    if "-h" in argv or "--help" in argv:
        return _print_help(parser)
    roclip_args, rest = parser.parse_known_args(argv)
    check_parsed(parser, roclip_args)
    import open_clip_train.main as oc_main
    from open_clip_train.params import parse_args

    openclip_args = parse_args(rest)
    warn_cpu_precision(openclip_args)
    if not roclip_args.roclip:
        given = [a.split("=")[0] for a in argv if a.startswith(FLAG_PREFIX)]
        if given:
            raise UsageError(f"{', '.join(given)} given without --roclip; add --roclip")
        return _exit_code(oc_main.main(rest))
    check_openclip_args(openclip_args)
    try:
        config = config_from_namespace(roclip_args)
    except ValueError as err:
        raise UsageError(str(err)) from err
    from roclip_openclip.patches import OpenClipPatches

    try:
        policy = build_policy(config, pm)
    except (ValueError, ImportError) as err:
        raise UsageError(str(err)) from err
    check_resume_state(openclip_args, config)
    with OpenClipPatches(
        config, pm, roclip_args, suspicious_margin=config.suspicious_margin, policy=policy
    ):
        try:
            return _exit_code(oc_main.main(rest))
        except StateError as err:  # --resume latest: the file OpenCLIP found
            raise UsageError(f"--resume {openclip_args.resume}: {err}") from None


def _exit_code(result: Any) -> int:
    """OpenCLIP's ``main`` returns None on success and -1 on some early errors."""
    return 0 if result is None else (1 if result == -1 else int(result))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
