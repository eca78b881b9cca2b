"""torchrun, OpenCLIP's own distributed set-up, with two CPU ranks (gloo): both ranks share one
pool and decide alike, and ``--accum-freq`` on two ranks trains as one large batch (slow).
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn.datasets")

from roclip_openclip.patches import state_path_for  # noqa: E402

from .runs import (  # noqa: E402
    ROCLIP,
    _argv,
    _ckpt,
    _without_key_bias,
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str]) -> str:
    """Run ``argv`` under torchrun, two CPU ranks (gloo); returns stdout and stderr."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "roclip_openclip",
        "--",
        *argv,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD", "LOCAL"))}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def test_torchrun_two_cpu_ranks_share_one_pool(setup) -> None:
    """torchrun, OpenCLIP's own distributed set-up (gloo on CPU): the same pool on both ranks."""
    output = _torchrun(_argv(setup, "torchrun", 2, *ROCLIP))
    lines = re.findall(
        r"RoCLIP epoch (\d+) rank (\d): matching=(\w+) pool=(\d+)/64 checksum=(\S+)", output
    )
    by_rank = {r: [(e, m, f, c) for e, rr, m, f, c in lines if rr == r] for r in ("0", "1")}
    assert len(by_rank["0"]) == len(by_rank["1"]) == 2
    assert by_rank["0"] == by_rank["1"]  # same decisions, fill and pool checksum every epoch
    assert [m for _, m, _, _ in by_rank["0"]] == ["False", "True"]
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+)", output)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_torchrun_accum_freq_trains_as_one_large_batch(setup) -> None:
    """Two gloo ranks: --batch-size 4 --accum-freq 2 is --batch-size 8, pool and weights."""
    _torchrun(_argv(setup, "torchrun-accum", 2, *ROCLIP, "--batch-size", "4", "--accum-freq", "2"))
    _torchrun(_argv(setup, "torchrun-large", 2, *ROCLIP, "--batch-size", "8"))
    a = torch.load(_ckpt(setup, "torchrun-accum", 2), weights_only=False)["state_dict"]
    b = torch.load(_ckpt(setup, "torchrun-large", 2), weights_only=False)["state_dict"]
    for key in b:
        torch.testing.assert_close(_without_key_bias(a, key), _without_key_bias(b, key), msg=key)
    pa = torch.load(state_path_for(_ckpt(setup, "torchrun-accum", 2)), weights_only=False)
    pb = torch.load(state_path_for(_ckpt(setup, "torchrun-large", 2)), weights_only=False)
    assert pa["roclip"]["step"] == pb["roclip"]["step"] == 12
    torch.testing.assert_close(
        pa["roclip"]["pool"]["features"], pb["roclip"]["pool"]["features"], atol=1e-5, rtol=0
    )
