"""The example CSV plugin: found through the `roclip` entry-point group, fed by the hooks."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import roclip_torch
import torch
import torch.nn.functional as F
from roclip_torch import RoClipAdapter, add_arguments
from roclip_torch.csv_stats import FIELDS, MARGIN_ENV, PATH_ENV, CsvMatchStats

import roclip_plugin
from roclip_plugin import RoClipConfig, get_plugin_manager, hookimpl
from roclip_plugin.loss import DistInfo
from roclip_plugin.plugins import AUTOLOAD_ENV

HERE = Path(__file__).resolve().parent
# the folders holding the packages this process imported: the subprocess must run the same tree
# (a worktree's, say), not whatever an editable install points to
TREE = list(
    dict.fromkeys(str(Path(m.__file__).resolve().parents[1]) for m in (roclip_plugin, roclip_torch))
)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import roclip_plugin
    from roclip_plugin import RoClipConfig
    from test_torch_loop import make_run

    pm = roclip_plugin.get_plugin_manager()
    config = RoClipConfig.from_preset("paper",
        pool_size=64, first_defended_epoch=1, defend_every=1, suspicious_margin=0.05
    )
    make_run(None, config, epochs=2, n=128, plugin_manager=pm).fit()
    print(json.dumps({
        "plugins": sorted(name for name, _ in pm.list_name_plugin()),
        "open_clip": sorted(m for m in sys.modules if "open_clip" in m),
    }))
    """
)


def _install_entry_point(folder: Path) -> None:
    """What `pip install` of a package declaring the entry point would leave on the path."""
    dist = folder / "roclip_csv_example-0.1.dist-info"
    dist.mkdir()
    meta = "Metadata-Version: 2.1\nName: roclip-csv-example\nVersion: 0.1\n"
    (dist / "METADATA").write_text(meta)
    (dist / "entry_points.txt").write_text("[roclip]\ncsv_stats = roclip_torch.csv_stats:plugin\n")


def test_entry_point_plugin_writes_match_statistics(tmp_path: Path) -> None:
    _install_entry_point(tmp_path)
    stats = tmp_path / "out" / "stats.csv"
    env = {k: v for k, v in os.environ.items() if k not in (AUTOLOAD_ENV, MARGIN_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(HERE), *TREE])
    env[PATH_ENV] = str(stats)
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert "csv_stats" in report["plugins"]
    assert report["open_clip"] == []

    with stats.open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == FIELDS
    # Epoch 0 is plain; epoch 1 matches on each of its 4 steps (128 samples, batch 32).
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", str(s)) for s in range(4, 8)]
    assert [int(r["pool_fill"]) for r in rows] == [64, 64, 64, 64]
    assert all(r["margin"] == "0.05" for r in rows)  # from the config's suspicious_margin
    assert all(0 <= int(r["above_margin"]) <= int(r["samples"]) == 32 for r in rows)
    assert all(-1 <= float(r["own_similarity"]) <= 1 for r in rows)


class _Margins:
    def __init__(self) -> None:
        self.margins: list[torch.Tensor] = []

    @hookimpl
    def roclip_after_match(self, stats):
        self.margins.append(stats.margins.clone())


def test_rows_count_the_samples_above_the_margin(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    plugin, margins = CsvMatchStats(path, margin=0.1), _Margins()
    adapter = RoClipAdapter(
        RoClipConfig.from_preset("paper"),
        plugin_manager=get_plugin_manager(),
        plugins=[plugin, margins],
        dist_info=DistInfo(),
    )
    g = torch.Generator().manual_seed(3)
    for epoch in range(8):  # the paper preset matches epochs 5 and 7
        adapter.epoch_start(epoch)
        for _ in range(2):
            img = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
            txt = F.normalize(img + torch.randn(16, 8, generator=g), dim=-1)
            adapter.loss(img, txt, 10.0)
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [5, 5, 7, 7]
    want = [int((m > 0.1).sum()) for m in margins.margins]
    assert [int(r["above_margin"]) for r in rows] == want
    assert sum(want) > 0  # noisy captions: some images prefer another caption


def test_plugin_options_come_from_the_loops_parser(tmp_path: Path) -> None:
    pm = get_plugin_manager()
    plugin = CsvMatchStats()
    pm.register(plugin)
    parser = argparse.ArgumentParser()
    assert add_arguments(parser, pm) is pm
    args = parser.parse_args(
        ["--roclip-preset", "reference", "--roclip-pool-size", "64"]
        + ["--roclip-csv-stats-path", str(tmp_path / "x.csv"), "--roclip-csv-stats-margin", "0.5"]
    )
    adapter = RoClipAdapter.from_args(args, plugin_manager=pm, dist_info=DistInfo())
    assert adapter.config.pool_size == 64 and adapter.config.pool_update == "defended_epochs"
    assert plugin.path == tmp_path / "x.csv" and plugin.margin == 0.5
