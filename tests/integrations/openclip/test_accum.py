"""Gradient accumulation (``--accum-freq``): ``--batch-size 8 --accum-freq 2`` trains as
``--batch-size 16`` (weights, pool, steps and suspicious rows) and resumes exactly.
"""

from __future__ import annotations

import csv
import re

import pytest
import torch

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn.datasets")

from roclip_openclip import main  # noqa: E402
from roclip_openclip.patches import state_path_for  # noqa: E402

from .runs import (  # noqa: E402
    ROCLIP,
    _argv,
    _assert_same_run,
    _ckpt,
    _log,
    _stop_after_epoch_two,
    _without_key_bias,
)

ACCUM = ["--batch-size", "8", "--accum-freq", "2"]


def _suspicious(setup, name: str, epoch: int) -> dict[int, float]:
    with _ckpt(setup, name, epoch).with_name(f"suspicious_epoch_{epoch}.csv").open() as fh:
        return {int(r["index"]): float(r["margin"]) for r in csv.DictReader(fh)}


def test_accum_freq_trains_as_one_large_batch_and_resumes_exactly(setup, straight) -> None:
    """--batch-size 8 --accum-freq 2 is --batch-size 16: pool, weights, reports; then resume."""
    assert main(_argv(setup, "accum", 3, *ROCLIP, *ACCUM)) == 0
    log = _log(setup, "accum")
    matching = re.findall(r"RoCLIP epoch (\d+) rank 0: matching=(\w+) pool=(\d+)/64", log)
    assert [(int(e), m) for e, m, _ in matching] == [(0, "False"), (1, "True"), (2, "False")]
    a = torch.load(_ckpt(setup, "accum", 3), weights_only=False)["state_dict"]
    b = torch.load(_ckpt(setup, straight, 3), weights_only=False)["state_dict"]
    for key in b:  # up to floating-point reassociation (two micro-batches, not one batch)
        torch.testing.assert_close(_without_key_bias(a, key), _without_key_bias(b, key), msg=key)
    pa = torch.load(state_path_for(_ckpt(setup, "accum", 3)), weights_only=False)["roclip"]
    pb = torch.load(state_path_for(_ckpt(setup, straight, 3)), weights_only=False)["roclip"]
    assert pa["step"] == pb["step"] == 18  # optimiser steps, not micro-batches
    assert pa["pool"]["total_written"] == pb["pool"]["total_written"] == 18 * 16
    torch.testing.assert_close(pa["pool"]["features"], pb["pool"]["features"], atol=1e-5, rtol=0)
    margins_a, margins_b = _suspicious(setup, "accum", 2), _suspicious(setup, straight, 2)
    assert margins_a.keys() == margins_b.keys() == set(range(96))  # rows tied to their samples
    for index, margin in margins_b.items():
        assert abs(margins_a[index] - margin) < 1e-4, index

    _stop_after_epoch_two(_argv(setup, "accum-stopped", 3, *ROCLIP, *ACCUM))
    resume = ["--resume", str(_ckpt(setup, "accum-stopped", 2))]
    assert main(_argv(setup, "accum-resumed", 3, *ROCLIP, *ACCUM, *resume)) == 0
    _assert_same_run(setup, "accum", "accum-resumed")
