from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from roclip_plugin.cli import main


def test_demo_runs_and_writes_results(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    argv = [
        "smoke",
        "--epochs",
        "3",
        "--train",
        "1500",
        "--json",
        str(out),
        "--roclip-preset",
        "paper",
        "--roclip-first-defended-epoch",
        "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "RoCLIP + aug" in printed and "target ASR" in printed
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["CLIP", "CLIP + aug", "RoCLIP + aug"]
    assert data["results"][2]["defended_epochs"] == [1]  # first defended epoch 1, then every 2
    assert data["config"]["pool_size"] == 174  # the demo's default: 10% of 1500 + 240 pairs
    for r in data["results"]:
        assert 0.0 <= r["zero_shot"] <= 1.0 and 0.0 <= r["targeted_asr"] <= 1.0


def test_flags_lists_every_field(capsys) -> None:
    from roclip_plugin.config import all_flags

    assert main(["flags", "--preset", "reference"]) == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in all_flags())


def test_bad_values_exit_2_with_the_flag_named(capsys) -> None:
    assert main(["smoke", "--roclip-pool-size", "0"]) == 2
    assert "pool_size (--roclip-pool-size): invalid value 0" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_a_clear_error(capsys) -> None:
    assert main(["smoke", "--device", "cuda"]) == 2
    assert "no CUDA device is visible; use --device cpu" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "epochs (--epochs): invalid value 0"),
        (["--train", "-5"], "train (--train): invalid value -5"),
        (["--seed", "-1"], "seed (--seed): invalid value -1"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--roclip-image-aug", "bogus"], "--roclip-image-aug: unknown image augmentation"),
        (["--roclip-text-aug", "bogus"], "--roclip-text-aug: unknown text augmentation"),
        (
            ["--roclip-matcher", "faiss", "--roclip-precision", "bf16"],
            "--roclip-precision bf16: --roclip-matcher faiss",
        ),
    ],
)
def test_smoke_refuses_before_training(argv, message, capsys, monkeypatch) -> None:
    import roclip_plugin.smoke

    monkeypatch.setattr(roclip_plugin.smoke, "run_demo", _must_not_run)
    assert main(["smoke", *argv]) == 2
    out = capsys.readouterr().out
    assert message in out and "Traceback" not in out


def _must_not_run(*args, **kwargs):
    raise AssertionError("the command started its work on bad input")


def test_smoke_refuses_nltk_synonyms_without_nltk(capsys, monkeypatch) -> None:
    import roclip_plugin.augment.synonyms
    import roclip_plugin.smoke

    monkeypatch.setattr(roclip_plugin.augment.synonyms, "nltk_wordnet_available", lambda: False)
    monkeypatch.setattr(roclip_plugin.smoke, "run_demo", _must_not_run)
    assert main(["smoke", "--roclip-text-aug", "eda", "--roclip-eda-synonyms", "nltk"]) == 2
    assert "--roclip-eda-synonyms" in capsys.readouterr().out


def test_smoke_json_that_is_a_directory_is_refused_first(tmp_path: Path, capsys, monkeypatch):
    import roclip_plugin.smoke

    monkeypatch.setattr(roclip_plugin.smoke, "run_demo", _must_not_run)
    assert main(["smoke", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a directory" in capsys.readouterr().out


def test_smoke_json_empty_path_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["smoke", "--json", ""])
    assert exit_.value.code == 2
    assert "argument --json: an empty path" in capsys.readouterr().err


def test_smoke_none_augmentation_turns_its_stand_in_off() -> None:
    from roclip_plugin.config import RoClipConfig
    from roclip_plugin.smoke import DemoSettings, stand_ins

    s = DemoSettings()
    off = stand_ins(s, RoClipConfig(image_aug="none", text_aug="none"))
    assert (off.image_noise, off.word_dropout) == (0.0, 0.0)
    assert stand_ins(s, RoClipConfig(text_aug="eda")) == s
    assert stand_ins(s, RoClipConfig()).word_dropout == 0.0  # the default leaves captions


def test_flags_prints_plain_percent_signs(capsys) -> None:
    assert main(["flags"]) == 0
    out = capsys.readouterr().out
    assert "%%" not in out and "epoch % K" in out


def test_help_is_plain_text_and_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["flags", "--help"])
    assert "whose values to list" in capsys.readouterr().out


def test_smoke_help_shows_the_pool_size_that_runs(capsys) -> None:
    from roclip_plugin.cli import smoke_defaults
    from roclip_plugin.smoke import DemoSettings

    with pytest.raises(SystemExit):
        main(["smoke", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    pool_help = text.split("--roclip-pool-size ROCLIP_POOL_SIZE ")[-1].split("--roclip-")[0]
    runs = smoke_defaults(DemoSettings().pairs)["pool_size"]
    assert pool_help.endswith(
        f"(default: 10% of the training pairs, {runs} for the default --train 20000) "
    )
    assert runs == 2024 and "(default: 21845)" not in text


def test_broken_pipe_is_quiet(monkeypatch) -> None:
    import roclip_plugin.cli as cli

    def closed(*args, **kwargs):
        raise BrokenPipeError

    monkeypatch.setattr(cli, "build_parser", closed)
    monkeypatch.setattr(cli, "detach_stdout", lambda: None)
    assert cli.main(["--help"]) == 141


def test_os_errors_of_a_command_are_one_line(capsys, monkeypatch) -> None:
    import roclip_plugin.cli as cli

    def denied(args, console):
        raise PermissionError(13, "Permission denied", "/x/results.json")

    monkeypatch.setattr(cli, "_flags", denied)
    assert cli.main(["flags"]) == 2
    out = capsys.readouterr().out
    assert "error: /x/results.json: Permission denied" in out and "Traceback" not in out


def test_smoke_warns_when_the_defense_would_be_off_or_ineffective(capsys) -> None:
    argv = ["smoke", "--epochs", "2", "--train", "600", "--roclip-pool-size", "4096"]
    argv += ["--roclip-preset", "paper"]  # its first matching epoch is 5
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: RoCLIP never defends in this run" in out
    assert "--roclip-first-defended-epoch to at most 1" in out
    assert "(--roclip-pool-size 4096) holds 488% of an epoch's 840 training pairs" in out
