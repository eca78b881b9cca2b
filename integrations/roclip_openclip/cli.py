"""``roclip-openclip-train``: OpenCLIP's training script plus ``--roclip``.

Accepts every flag of ``python -m open_clip_train.main`` plus ``--roclip`` and the
``--roclip-*`` flags (one per :class:`~roclip_plugin.RoClipConfig` field). Without ``--roclip``
it runs OpenCLIP untouched. Options RoCLIP cannot honour stop the run before training starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pluggy

from roclip_openclip import openclip_api
from roclip_openclip.preflight import (
    check_finite_numbers,
    check_openclip_values,
    embed_dim,
    strict_aug_cfg,
)
from roclip_openclip.usage import UsageError
from roclip_plugin import RoClipConfig, get_plugin_manager
from roclip_plugin.augment import build_policy
from roclip_plugin.checks import check_pool_fits, device_memory_bytes
from roclip_plugin.config import FLAG_PREFIX, add_argparse_args, config_from_namespace
from roclip_plugin.io import StateError, detach_stdout
from roclip_plugin.matching import check_matcher_settings
from roclip_plugin.siglip import SIGLIP_DIST_IMPLS
from roclip_plugin.validation import check_parsed, empty_value_error

log = logging.getLogger("roclip")
TORCH_LOGGER = "torch"


def check_version() -> None:
    """Refuse open_clip_torch versions whose training script the patches were not built for."""
    version = openclip_api.installed_version()
    if version is None:
        raise UsageError("open_clip_torch is not installed: pip install 'roclip-plugin[openclip]'")
    if not openclip_api.is_supported(version):
        (low, high), (major, minor) = openclip_api.SUPPORTED, version
        raise UsageError(
            f"open_clip_torch {major}.{minor} is not supported by roclip-openclip-train "
            f"(supported: {low[0]}.{low[1]} to <{high[0]}.{high[1]}); "
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


class _Captured(Exception):
    """Stops OpenCLIP's ``parse_args`` once its parser is built (see :func:`openclip_parser`)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def openclip_parser() -> argparse.ArgumentParser:
    """OpenCLIP's own argument parser, as ``open_clip_train.params.parse_args`` builds it.

    OpenCLIP builds its parser inside ``parse_args`` and keeps no handle on it, yet the checks
    of empty and non-finite values need its flags (their types, defaults and names), and so
    does the flag fuzz. The parser is taken at the moment ``parse_args`` would parse, so every
    flag of the installed OpenCLIP is there and nothing is parsed.
    """
    parse_args = openclip_api.PARAMS_PARSE_ARGS.get()
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        parse_args([])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise UsageError("open_clip_train.params.parse_args built no parser; is OpenCLIP supported?")


def refuse_empty_values(args: Any) -> None:
    """Refuse an OpenCLIP flag given no value (``--seed=--``, ``--logs=``), naming it.

    OpenCLIP's parser stores such values as ``[]`` or ``""`` and trains with them: ``--seed=--``
    started a run. With or without ``--roclip``, since an empty value is never meant.
    """
    message = empty_value_error(openclip_parser(), args)
    if message:
        raise UsageError(message)


def check_openclip_args(args: Any) -> None:
    """Stop before training on options RoCLIP cannot honour."""
    problems = []
    if getattr(args, "distill_model", None):
        problems.append("--distill-model: distillation adds a second loss RoCLIP does not handle")
    impl = getattr(args, "loss_dist_impl", None)
    if getattr(args, "siglip", False) and impl not in (None, *SIGLIP_DIST_IMPLS):
        problems.append(
            f"--loss-dist-impl {impl}: OpenCLIP's SigLIP loss knows "
            f"{', '.join(SIGLIP_DIST_IMPLS)}; choose one of them"
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
    try:
        openclip_api.PARAMS_PARSE_ARGS.get()(["--help"])
    except SystemExit:
        pass
    print()
    parser.print_help()
    return 0


@contextlib.contextmanager
def quiet_torch_logs(args: Any) -> Iterator[None]:
    """Keep torch's own INFO lines (TorchDynamo's metrics at exit) out of OpenCLIP's log.

    OpenCLIP's ``setup_logging`` sets every existing logger, torch's included, to INFO, so each
    run ended with TorchDynamo INFO lines the user did not ask for. After it runs, torch's
    loggers go back to WARNING, unless the user asked for detail: OpenCLIP's ``--debug`` or
    torch's own ``TORCH_LOGS`` variable.
    """
    original = openclip_api.SETUP_LOGGING.get()
    verbose = bool(getattr(args, "debug", False) or os.environ.get("TORCH_LOGS"))

    def setup_logging(log_file: Any, level: Any, include_host: bool = False) -> None:
        original(log_file, level, include_host=include_host)
        if not verbose:
            for name in [TORCH_LOGGER, *logging.root.manager.loggerDict]:
                if name == TORCH_LOGGER or name.startswith(TORCH_LOGGER + "."):
                    logging.getLogger(name).setLevel(logging.WARNING)

    with openclip_api.SETUP_LOGGING.replaced(setup_logging):
        yield


def check_resume_state(args: Any, config: RoClipConfig) -> None:
    """Refuse, before the model and data are built, a ``--resume`` state that cannot be restored.

    The state of ``epoch_3.pt`` is ``epoch_3.roclip`` beside it (:mod:`roclip_openclip.state`):
    an empty, truncated or foreign file, a state with entries missing, or a pool of another
    ``--roclip-pool-size`` would otherwise stop the run only after minutes of set-up. Where
    the file's name needs the checkpoint's epoch (``--resume latest``, ``epoch_latest.pt``)
    or the checkpoint is remote, the same checks run when the state is restored, before the
    first step, and end the same way (exit 2, one line).
    """
    from roclip_openclip.state import STATE_SUFFIX, check_state_file, is_remote, sibling

    resume = getattr(args, "resume", None)
    if not resume or resume == "latest" or is_remote(str(resume)):
        return
    stem = str(resume).rsplit("/", 1)[-1].rsplit(".", 1)[0]
    try:
        check_state_file(sibling(str(resume), stem + STATE_SUFFIX), config.pool_size)
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
    parse_args = openclip_api.PARAMS_PARSE_ARGS.get()
    with strict_aug_cfg():
        # argparse alone first: parse_args's own step after parsing (the model's default
        # optimizer settings) would crash on an empty --model before the check could run
        refuse_empty_values(openclip_parser().parse_args(rest))
        openclip_args = parse_args(rest)
    warn_cpu_precision(openclip_args)
    if not roclip_args.roclip:
        given = [a.split("=")[0] for a in argv if a.startswith(FLAG_PREFIX)]
        if given:
            raise UsageError(f"{', '.join(given)} given without --roclip; add --roclip")
        with quiet_torch_logs(openclip_args):
            return _exit_code(openclip_api.MAIN.get()(rest))
    check_openclip_args(openclip_args)
    try:
        config = config_from_namespace(roclip_args)
        check_matcher_settings(config)
        check_openclip_values(openclip_args)  # before: its --lr message says > 0 too
        check_finite_numbers(openclip_parser(), openclip_args)
        memory = device_memory_bytes(str(getattr(openclip_args, "device", "cuda")))
        check_pool_fits(config.pool_size, embed_dim(openclip_args), memory)
    except ValueError as err:
        raise UsageError(str(err)) from err
    from roclip_openclip.patches import OpenClipPatches

    try:
        policy = build_policy(config, pm, openclip_args.epochs)
    except (ValueError, ImportError) as err:
        raise UsageError(str(err)) from err
    check_resume_state(openclip_args, config)
    with (
        OpenClipPatches(
            config, pm, roclip_args, suspicious_margin=config.suspicious_margin, policy=policy
        ),
        quiet_torch_logs(openclip_args),
    ):
        return _exit_code(openclip_api.MAIN.get()(rest))


def _exit_code(result: Any) -> int:
    """OpenCLIP's ``main`` returns None on success and -1 on some early errors."""
    return 0 if result is None else (1 if result == -1 else int(result))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
