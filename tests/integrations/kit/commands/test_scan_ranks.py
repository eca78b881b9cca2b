"""``roclip scan`` under torchrun: two gloo processes on the CPU split the chunks of one store.

Each rank embeds every other chunk into the same ``--out``; rank 0 alone scores and writes.
The scores must be those of a scan in one process (both in fresh processes of one thread,
so the embeddings are computed alike).
"""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("faiss")

import torch.multiprocessing as mp  # noqa: E402

from roclip_plugin.scan import DETECTORS  # noqa: E402

from ..tiny import run_roclip  # noqa: E402
from .test_scan import setup  # noqa: E402, F401 (the module's fixture)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, argv: list[str], log: str) -> None:
    """One process of the scan, with the environment torchrun gives its ranks."""
    import torch

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    result = run_roclip(argv)
    Path(f"{log}.{rank}.json").write_text(json.dumps([result.code, result.output]))


def _run(world: int, argv: list[str], log: Path) -> list[tuple[int, str]]:
    mp.spawn(_worker, args=(world, _free_port(), argv, str(log)), nprocs=world, join=True)
    return [tuple(json.loads(Path(f"{log}.{r}.json").read_text())) for r in range(world)]


def _scores(out: Path) -> dict[str, list[str]]:
    with (out / "scores.csv").open(newline="") as fh:
        rows = sorted(csv.DictReader(fh, delimiter="\t"), key=lambda r: int(r["row"]))
    return {name: [r[name] for r in rows] for name in ("rank", *DETECTORS)}


def test_two_processes_split_the_chunks_and_score_as_one(setup, tmp_path) -> None:  # noqa: F811
    argv = ["scan", "--checkpoint", str(setup["checkpoint"]), "--dataset", str(setup["dataset"])]
    argv += ["--chunk-size", "64", "--k", "8", "--threads", "1", "--drop-count", "5"]
    one = _run(1, [*argv, "--out", str(tmp_path / "one")], tmp_path / "one-log")
    assert one[0][0] == 0, one[0][1]
    two = _run(2, [*argv, "--out", str(tmp_path / "two")], tmp_path / "two-log")
    assert [code for code, _ in two] == [0, 0], two

    output0, output1 = (" ".join(output.split()) for _, output in two)  # unwrapped lines
    assert "in 2 processes" in output0 and "most suspicious pairs" in output0
    assert "Scanning" not in output1 and "wrote" not in output1  # rank 1 only embeds
    store = tmp_path / "two" / "embeddings"
    records = [
        json.loads((store / name).read_text()) for name in ("progress.json", "progress.1.json")
    ]
    chunks = -(-len(_scores(tmp_path / "one")["rank"]) // 64)
    assert records[0]["done"] == list(range(0, chunks, 2))  # rank r: chunks r, r + 2, ...
    assert records[1]["done"] == list(range(1, chunks, 2))
    assert _scores(tmp_path / "two") == _scores(tmp_path / "one")
    kept = (tmp_path / "two" / "kept_keys.txt").read_text()
    assert kept == (tmp_path / "one" / "kept_keys.txt").read_text()
