"""Usage of ``roclip-openclip-train``: what it refuses before training (an unknown
augmentation, unsupported options, ``--roclip-*`` flags without ``--roclip``), its help (also
into a closed pipe), and the warning for ``--precision amp`` on the CPU.
"""

from __future__ import annotations

import pytest

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn.datasets")

import roclip_openclip.cli  # noqa: E402
from roclip_openclip import main  # noqa: E402

from .runs import (  # noqa: E402
    ROCLIP,
    _argv,
)


def test_unknown_augmentation_is_a_usage_error(setup, capsys) -> None:
    assert main(_argv(setup, "bad-aug", 1, *ROCLIP, "--roclip-text-aug", "nope")) == 2
    assert "--roclip-text-aug: unknown text augmentation 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--siglip", "--loss-dist-impl", "ring"], "--loss-dist-impl ring"),
        (["--roclip-defend-every", "0"], "defend_every (--roclip-defend-every): invalid"),
    ],
)
def test_unsupported_options_stop_before_training(setup, capsys, extra, message) -> None:
    assert main(_argv(setup, "refused", 1, "--roclip", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (setup["root"] / "logs" / "refused").exists()


def test_roclip_flags_without_roclip_are_an_error(setup, capsys) -> None:
    assert main(_argv(setup, "no-flag", 1, "--roclip-pool-size", "8")) == 2
    assert "--roclip-pool-size given without --roclip" in capsys.readouterr().err


def test_help_lists_openclip_and_roclip_flags(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--train-data" in out and "--roclip-pool-size" in out and "--roclip " in out


def test_cpu_amp_warning(setup, capsys) -> None:
    argv = _argv(setup, "amp", 1, "--roclip", "--roclip-defend-every", "0")
    argv[argv.index("fp32")] = "amp"
    main(argv)
    assert "--precision amp runs float16 on the CPU" in capsys.readouterr().err


def test_help_into_a_closed_pipe_is_quiet(monkeypatch) -> None:
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr(roclip_openclip.cli, "detach_stdout", lambda: None)
    assert main(["--help"]) == 141
