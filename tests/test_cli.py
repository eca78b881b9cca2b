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
        "--roclip-first-rematch-epoch",
        "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "RoCLIP + aug" in printed and "target ASR" in printed
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["CLIP", "CLIP + aug", "RoCLIP + aug"]
    assert data["results"][2]["matching_epochs"] == [1]  # first matching epoch 1, then every 2
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



def test_smoke_warns_when_the_defense_would_be_off_or_ineffective(capsys) -> None:
    argv = ["smoke", "--epochs", "2", "--train", "600", "--roclip-pool-size", "4096"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: RoCLIP never matches in this run" in out
    assert "--roclip-first-rematch-epoch to at most 1" in out
    assert "(--roclip-pool-size 4096) holds 488% of an epoch's 840 training pairs" in out
