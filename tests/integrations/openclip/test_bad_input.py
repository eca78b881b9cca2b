"""Hostile input, generated, for ``roclip-openclip-train``: every ``--roclip-*`` flag and the
``--resume`` state checks this project adds exit 2 with one error line naming the flag, before
OpenCLIP's training starts and before its log folder exists. OpenCLIP's own flags are its
argparse's business and are not drawn here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("open_clip_train")

import open_clip_train.main  # noqa: E402
from roclip_openclip import main  # noqa: E402
from roclip_openclip.state import STATE_FORMAT  # noqa: E402

from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager  # noqa: E402
from roclip_plugin.testing import (  # noqa: E402
    assert_refused,
    bad_input_settings,
    bad_roclip_values,
    run_command,
)

SETTINGS = bad_input_settings(6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openclip-bad-input")
    (root / "train.csv").write_text("filepath\ttitle\nimg.png\ta digit\n")
    states = root / "states"
    states.mkdir()
    good = RoClipDefense(RoClipConfig(pool_size=64), plugin_manager=get_plugin_manager())
    good.pool.enqueue(torch.nn.functional.normalize(torch.randn(4, 8), dim=-1))
    other = RoClipDefense(RoClipConfig(pool_size=32), plugin_manager=get_plugin_manager())
    saved = {"format": STATE_FORMAT, "completed_epochs": 1, "step": 6, "rng": []}
    contents = {
        "empty": b"",
        "garbage": b"\x80\x04not a pickle at all",
        "other-pool": {**saved, "roclip": other.state_dict()},
        "no-roclip": saved,
        "no-epoch": {k: v for k, v in saved.items() if k != "completed_epochs"} | {
            "roclip": good.state_dict()},
        "wrong-format": {**saved, "format": 99, "roclip": good.state_dict()},
        "no-pool": {**saved, "roclip": {
            k: v for k, v in good.state_dict().items() if k != "pool"}},
    }  # fmt: skip
    for name, content in contents.items():
        checkpoint = states / f"{name}.pt"
        checkpoint.write_bytes(b"OpenCLIP never reads this")
        target = states / f"{name}.roclip"
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            torch.save(content, target)
    return root


def _never(*args, **kwargs):
    raise AssertionError("OpenCLIP's training started with a bad value")


def _argv(run_dir: Path, *extra: str) -> list[str]:
    return [
        "--roclip", "--train-data", str(run_dir / "train.csv"), "--dataset-type", "csv",
        "--precision", "fp32", "--device", "cpu", "--logs", str(run_dir / "logs"),
        "--name", "refused", "--roclip-pool-size", "64", "--batch-size", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("flag", list(bad_roclip_values()))
@SETTINGS
@given(data=st.data())
def test_every_bad_roclip_value_stops_before_training(flag, data, run_dir, monkeypatch) -> None:
    monkeypatch.setattr(open_clip_train.main, "main", _never)
    value = data.draw(bad_roclip_values()[flag], label=flag)
    assert_refused(run_command(main, _argv(run_dir, f"{flag}={value}")), flag)
    assert not (run_dir / "logs").exists()


@pytest.mark.parametrize(
    "state", ["empty", "garbage", "other-pool", "no-roclip", "no-epoch", "wrong-format", "no-pool"]
)
def test_a_resume_state_that_cannot_be_restored_stops_before_training(
    state, run_dir, monkeypatch
) -> None:
    monkeypatch.setattr(open_clip_train.main, "main", _never)
    checkpoint = run_dir / "states" / f"{state}.pt"
    assert_refused(run_command(main, _argv(run_dir, "--resume", str(checkpoint))), "--resume")
    assert not (run_dir / "logs").exists()


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--roclip-precision", "bf16"], "--roclip-precision"),
        (["--roclip-match-chunk-size", "128"], "--roclip-match-chunk-size"),
    ],
)
def test_settings_the_faiss_matcher_would_ignore_stop_before_training(
    extra, flag, run_dir, monkeypatch
) -> None:
    monkeypatch.setattr(open_clip_train.main, "main", _never)
    argv = _argv(run_dir, "--roclip-matcher", "faiss", *extra)
    assert_refused(run_command(main, argv), flag)
    assert not (run_dir / "logs").exists()


@pytest.mark.parametrize(
    ("extra", "flag", "message"),
    [
        (["--train-data", "missing.csv"], "--train-data", "does not exist"),
        (["--epochs", "0"], "--epochs", "must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size", "must be an integer >= 1"),
        (["--batch-size", "-4"], "--batch-size", "must be an integer >= 1"),
        (["--batch-size", "2"], "--batch-size", "larger than the 1 rows of --train-data"),
        (["--lr", "0"], "--lr", "must be a finite number > 0"),
        (["--lr=-1e-3"], "--lr", "must be a finite number > 0"),
        (["--lr", "nan"], "--lr", "must be a finite number > 0"),
        (["--workers", "-1"], "--workers", "must be an integer >= 0"),
        (["--warmup", "-1"], "--warmup", "must be an integer >= 0"),
        (["--accum-freq", "0"], "--accum-freq", "must be an integer >= 1"),
        (["--train-num-samples", "0"], "--train-num-samples", "must be an integer >= 1"),
        (["--model", "RN51"], "--model", "is not an OpenCLIP model (did you mean RN50"),
        (["--model", "local-dir:/nowhere"], "--model", "holds no open_clip_config.json"),
        (["--roclip-pool-size", "2000000000"], "--roclip-pool-size", "GiB"),
    ],
)
def test_bad_openclip_values_stop_before_training(
    extra, flag, message, run_dir, monkeypatch
) -> None:
    """OpenCLIP's own flags, as a --roclip run sees them: one line, exit 2, nothing started."""
    monkeypatch.setattr(open_clip_train.main, "main", _never)
    monkeypatch.chdir(run_dir)
    result = run_command(main, _argv(run_dir, *extra))
    assert_refused(result, flag)
    assert message in result.output
    assert not (run_dir / "logs").exists()


def test_train_data_that_is_a_folder_stops_before_training(run_dir, monkeypatch) -> None:
    monkeypatch.setattr(open_clip_train.main, "main", _never)
    folder = run_dir / "folder.csv"
    folder.mkdir(exist_ok=True)
    result = run_command(main, _argv(run_dir, "--train-data", str(folder)))
    assert_refused(result, "--train-data")
    assert "is a directory" in result.output


def test_batch_check_counts_rows_per_torchrun_process(run_dir, monkeypatch) -> None:
    monkeypatch.setattr(open_clip_train.main, "main", _never)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_command(main, _argv(run_dir))  # 1 row, 2 processes: no batch of 1 each
    assert_refused(result, "--batch-size")
    assert "per process (2 processes)" in result.output


@pytest.mark.parametrize(
    ("extra", "env", "want"),
    [([], None, logging.WARNING), (["--debug"], None, logging.DEBUG), ([], "+dynamo", 0)],
)
@pytest.mark.parametrize("roclip", [True, False])
def test_torch_info_lines_stay_out_of_the_log_unless_asked(
    extra, env, want, roclip, run_dir, monkeypatch
) -> None:
    """OpenCLIP's setup_logging sets torch's loggers to INFO (TorchDynamo's exit metrics)."""
    import open_clip_train.main as oc_main

    seen = {}
    root_handlers, root_level = list(logging.root.handlers), logging.root.level
    dynamo = logging.getLogger("torch._dynamo")
    saved = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}

    def fake_main(argv):
        level = logging.DEBUG if "--debug" in argv else logging.INFO
        oc_main.setup_logging(None, level)
        seen["level"] = dynamo.getEffectiveLevel()

    monkeypatch.setattr(oc_main, "main", fake_main)
    if env is None:
        monkeypatch.delenv("TORCH_LOGS", raising=False)
    else:
        monkeypatch.setenv("TORCH_LOGS", env)
    argv = _argv(run_dir, *extra)
    if not roclip:
        argv = [a for a in argv if a != "--roclip"]
        argv = argv[: argv.index("--roclip-pool-size")] + argv[argv.index("--batch-size") :]
    try:
        assert run_command(main, argv).code == 0
    finally:
        logging.root.handlers[:] = root_handlers
        logging.root.setLevel(root_level)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    assert seen["level"] == (want or logging.INFO)


def test_the_image_stop_fraction_resolves_against_openclips_epochs(run_dir, monkeypatch) -> None:
    """Not bad input, but checked at the same point: before OpenCLIP's training starts."""
    from roclip_openclip import cli

    import roclip_plugin.augment as augment

    built = []

    def recording(config, pm, total_epochs=None):
        built.append(augment.build_policy(config, pm, total_epochs))
        return built[-1]

    monkeypatch.setattr(cli, "build_policy", recording)
    monkeypatch.setattr(open_clip_train.main, "main", lambda argv: None)
    argv = _argv(run_dir, "--epochs", "9", "--roclip-image-aug-stop-fraction", "0.5")
    assert run_command(main, argv).code == 0
    assert [policy.image_stop_epoch for policy in built] == [5]


def test_roclip_help_shows_the_defaults_that_run() -> None:
    from roclip_openclip.cli import build_parser

    from roclip_plugin.config import config_from_namespace, field_from_flag
    from roclip_plugin.testing import as_shown, assert_help_shows_defaults, shown_defaults

    parser = build_parser(get_plugin_manager())
    assert_help_shows_defaults(parser)
    runs = config_from_namespace(parser.parse_known_args([])[0])
    for flag, text in shown_defaults(parser).items():
        if flag.startswith("--roclip-") and flag != "--roclip-preset":
            assert text == as_shown(getattr(runs, field_from_flag(flag))), flag
