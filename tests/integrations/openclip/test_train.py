"""Training with ``--roclip`` through OpenCLIP's script: the matching schedule, the pool and
the suspicious-rows CSV it checkpoints, RoCLIP's scalars in TensorBoard and W&B, a run without
``--roclip`` that is plain OpenCLIP, the augmentation policy, every dataset type (CSV,
synthetic, WebDataset), the default preset, ``amp_bf16``, step blocks, a run that never
matches, and which sample each suspicious row names.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn.datasets")

import roclip_openclip.cli  # noqa: E402
from roclip_openclip import main  # noqa: E402
from roclip_openclip.patches import state_path_for  # noqa: E402

from roclip_plugin import get_plugin_manager, hookimpl  # noqa: E402

from .runs import (  # noqa: E402
    NAMES,
    ROCLIP,
    TEMPLATES,
    _argv,
    _ckpt,
    _log,
)


def test_roclip_run_matches_on_schedule_and_checkpoints_the_pool(setup) -> None:
    assert main(_argv(setup, "roclip", 3, *ROCLIP)) == 0
    log = _log(setup, "roclip")
    matching = re.findall(r"RoCLIP epoch (\d+) rank 0: matching=(\w+) pool=(\d+)/64", log)
    assert [(int(e), m) for e, m, _ in matching] == [(0, "False"), (1, "True"), (2, "False")]
    assert all(int(fill) == 64 for _, _, fill in matching)  # 96 captions/epoch fill the pool
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+)", log)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    state = torch.load(state_path_for(_ckpt(setup, "roclip", 3)), weights_only=False)
    assert len(state["roclip"]["pool"]["features"]) == 64
    assert state["roclip"]["epoch"] == 2
    suspicious = _ckpt(setup, "roclip", 2).with_name("suspicious_epoch_2.csv")
    with suspicious.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 96  # every training sample of the matching epoch, most suspicious first
    assert {r["caption"] for r in rows} <= {t.format(n) for t in TEMPLATES for n in NAMES}
    margins = [float(r["margin"]) for r in rows]
    assert margins == sorted(margins, reverse=True)
    assert "roclip_pool_size: 64" in (setup["root"] / "logs" / "roclip" / "params.txt").read_text()


ROCLIP_SCALARS = {
    f"roclip/{key}"
    for key in ("matching", "matched_similarity", "own_similarity", "suspicious_pairs", "pool_fill")
}


def test_roclip_scalars_reach_tensorboard_through_openclips_writer(setup) -> None:
    """``--report-to tensorboard``: RoCLIP's per-epoch scalars in OpenCLIP's own event file."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(_argv(setup, "tb", 3, *ROCLIP, "--report-to", "tensorboard")) == 0
    events = EventAccumulator(str(setup["root"] / "logs" / "tb" / "tensorboard"))
    events.Reload()  # read back from disk: main() returned and OpenCLIP never closed the writer
    tags = set(events.Tags()["scalars"])
    assert {t for t in tags if t.startswith("roclip/")} == ROCLIP_SCALARS
    assert "train/contrastive_loss" in tags  # OpenCLIP's own scalars share the file
    # 96 pairs in batches of 16: six steps an epoch; logged at the defense's step count
    matching = [(e.step, e.value) for e in events.Scalars("roclip/matching")]
    assert matching == [(6, 0.0), (12, 1.0), (18, 0.0)]
    assert [e.value for e in events.Scalars("roclip/pool_fill")] == [64.0, 64.0, 64.0]
    logged = re.search(r"RoCLIP epoch 1 rank 0: .* matched_sim=([0-9.]+)", _log(setup, "tb"))
    matched = events.Scalars("roclip/matched_similarity")[1].value
    assert logged is not None and matched == pytest.approx(float(logged.group(1)), abs=1e-4)


def test_roclip_scalars_reach_wandb_offline(setup, tmp_path, monkeypatch) -> None:
    """``--report-to wandb`` in offline mode (no account, no network): the real ``wandb.log``
    gets RoCLIP's scalars each epoch and the offline run is written. W&B's offline run file is
    its own binary format with no reader in the package, so the calls are what is checked."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[dict] = []
    real_log = wandb.sdk.wandb_run.Run.log  # wandb.init rebinds wandb.log to the run's method

    def spy(run, data: dict, *args, **kwargs):
        logged.append(dict(data))
        return real_log(run, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    assert main(_argv(setup, "wb", 2, *ROCLIP, "--report-to", "wandb")) == 0
    rows = [row for row in logged if ROCLIP_SCALARS & set(row)]
    assert [set(row) for row in rows] == [ROCLIP_SCALARS | {"epoch"}] * 2
    assert [(row["epoch"], row["roclip/matching"]) for row in rows] == [(0, 0.0), (1, 1.0)]
    assert any("train/contrastive_loss" in row for row in logged)  # OpenCLIP's own, same run
    (run,) = tmp_path.rglob("run-*.wandb")
    assert run.stat().st_size > 0


def test_without_roclip_it_is_plain_openclip(setup) -> None:
    import open_clip_train.main as oc_main

    assert main(_argv(setup, "wrapped", 2)) == 0
    assert oc_main.main(_argv(setup, "plain", 2)) is None
    wrapped = torch.load(_ckpt(setup, "wrapped", 2), weights_only=False)["state_dict"]
    plain = torch.load(_ckpt(setup, "plain", 2), weights_only=False)["state_dict"]
    assert wrapped.keys() == plain.keys()
    assert all(torch.equal(wrapped[k], plain[k]) for k in plain)
    loss = re.compile(r"Contrastive_loss: ([0-9.]+)")
    plain_losses = loss.findall(_log(setup, "plain"))
    # OpenCLIP adds a root file handler per main() call and never removes it, so the first
    # run's log also receives the second run's lines: compare the first run's own lines.
    assert (
        plain_losses and loss.findall(_log(setup, "wrapped"))[: len(plain_losses)] == plain_losses
    )
    assert not state_path_for(_ckpt(setup, "wrapped", 2)).exists()


class RecordAugmentations:
    """Text and image augmentations that record what they were given (workers=0: in-process)."""

    def __init__(self) -> None:
        self.captions: list[tuple[str, tuple[int, ...]]] = []
        self.images: list[tuple[int, ...]] = []

    @hookimpl
    def roclip_register_augmentations(self, register):
        def text(config):
            def augment(caption, key):
                self.captions.append((caption, key))
                return caption

            return augment

        def image(config):
            def augment(image, key):
                self.images.append(key)
                return image

            return augment

        register("text", "record", text)
        register("image", "record", image)


def test_augmentation_policy_on_the_training_split_only(setup, monkeypatch) -> None:
    recorder = RecordAugmentations()

    def with_recorder():
        pm = get_plugin_manager()
        pm.register(recorder)
        return pm

    augment = ["--roclip-text-aug", "record", "--roclip-image-aug", "record"]
    validation = ["--val-data", str(setup["data"]), "--val-frequency", "1"]
    monkeypatch.setattr(roclip_openclip.cli, "get_plugin_manager", with_recorder)
    assert main(_argv(setup, "augmented", 2, *ROCLIP, *augment, *validation)) == 0
    # 96 training rows x 2 epochs, each augmented once; validation rows (same CSV) never.
    assert len(recorder.captions) == len(recorder.images) == 2 * 96
    captions = {t.format(n) for t in TEMPLATES for n in NAMES}
    assert {c for c, _ in recorder.captions} <= captions
    # keys are (seed, epoch, row, stream): every row once per epoch, epochs told apart
    for keys in ([k for _, k in recorder.captions], recorder.images):
        assert sorted((k[1], k[2]) for k in keys) == [(e, i) for e in (0, 1) for i in range(96)]


def test_webdataset_training_data(setup) -> None:
    """WebDataset shards: RoCLIP trains; the suspicious CSV names each row by its ``__key__``
    and caption (the shard has no row index: -1)."""
    import io
    import tarfile

    shard = setup["root"] / "shard-000000.tar"
    with setup["data"].open() as fh, tarfile.open(shard, "w") as tar:
        for i, row in enumerate(csv.DictReader(fh, delimiter="\t")):
            for ext, payload in (
                ("png", Path(row["filepath"]).read_bytes()),
                ("txt", row["title"].encode()),
            ):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    argv = _argv(setup, "wds", 2, *ROCLIP)
    argv[argv.index(str(setup["data"]))] = str(shard)
    argv[argv.index("csv")] = "webdataset"
    argv += ["--train-num-samples", "96"]
    assert main(argv) == 0
    log = _log(setup, "wds")
    assert re.findall(r"RoCLIP epoch 1 rank 0: matching=True pool=64/64", log)
    suspicious = _ckpt(setup, "wds", 2).with_name("suspicious_epoch_2.csv")
    with suspicious.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["index"] for r in rows} == {"-1"}
    with setup["data"].open() as fh:
        titles = {f"{i:06d}": r["title"] for i, r in enumerate(csv.DictReader(fh, delimiter="\t"))}
    assert all(titles[r["key"]] == r["caption"] for r in rows)
    # the per-sample history needs ids: the keys give them (without, robust stops at step 1)
    argv[argv.index("wds")] = "wds-robust"
    assert main([*argv, "--roclip-preset", "robust"]) == 0


class RecordingMatcher:
    """Wraps the configured matcher and keeps what it was asked and what it answered."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @hookimpl
    def roclip_make_matcher(self, config):
        from roclip_plugin.matching import make_matcher

        inner = make_matcher(config)

        def match(images, pool):
            answer = inner(images, pool)
            self.calls.append((images.detach().clone(), pool.features(), answer.clone()))
            return answer

        return match


def _with_plugins(monkeypatch, *plugins) -> None:
    def manager():
        pm = get_plugin_manager()
        for plugin in plugins:
            pm.register(plugin)
        return pm

    monkeypatch.setattr(roclip_openclip.cli, "get_plugin_manager", manager)


def test_amp_bf16_run_matches_as_the_fp32_search(setup, monkeypatch) -> None:
    """--precision amp_bf16 computes the loss under autocast; the search stays float32."""
    from roclip_plugin.matching import nearest_captions

    recorder = RecordingMatcher()
    _with_plugins(monkeypatch, recorder)
    argv = _argv(setup, "amp-bf16", 2, *ROCLIP)
    argv[argv.index("fp32")] = "amp_bf16"
    assert main(argv) == 0
    assert len(recorder.calls) == 6  # every step of matching epoch 1
    for images, pool, answer in recorder.calls:
        assert torch.equal(answer, nearest_captions(images, pool, precision="fp32"))


def test_step_blocks_on_epoch_boundaries_log_and_report_the_right_epochs(setup) -> None:
    """--roclip-period-steps 6 with 6 steps an epoch: epoch 1 is the one matching block."""
    blocks = ["--roclip-period-steps", "6"]
    with pytest.warns(RuntimeWarning, match=r"pool-size 64\) holds 67% of an epoch's 96"):
        assert main(_argv(setup, "blocks", 3, *ROCLIP, *blocks)) == 0
    log = _log(setup, "blocks")
    matching = re.findall(r"RoCLIP epoch (\d+) rank 0: matching=(\w+)", log)
    assert matching == [("0", "False"), ("1", "True"), ("2", "False")]
    folder = _ckpt(setup, "blocks", 1).parent
    assert sorted(p.name for p in folder.glob("suspicious_*.csv")) == ["suspicious_epoch_2.csv"]
    assert "holds 67% of an epoch's 96 training pairs" in log  # also in OpenCLIP's log


def test_a_run_that_never_matches_says_so(setup) -> None:
    """The paper's first matching epoch is 5: a 2-epoch run would only augment."""
    paper = ["--roclip", "--roclip-preset", "paper", "--roclip-pool-size", "8"]
    argv = _argv(setup, "never", 2, *paper)
    with pytest.warns(RuntimeWarning, match="never defends") as record:
        assert main(argv) == 0
    assert "--roclip-first-defended-epoch" in str(record[0].message)
    log = _log(setup, "never")
    assert "RoCLIP never defends in this run" in log and "at most 1" in log


class RecordMargins:
    """Keeps every matching step's (global step, margins) as roclip_after_match reports them."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[float]]] = []

    @hookimpl
    def roclip_after_match(self, stats):
        self.steps.append((stats.step, stats.margins.float().cpu().tolist()))


@pytest.mark.parametrize(
    ("name", "flags", "epochs"),
    [
        # reference preset: epoch 1 matches, but its first step finds an empty pool (plain)
        ("ref", ["--roclip", "--roclip-preset", "reference", "--roclip-pool-size", "64"], 2),
        # blocks of 2 steps, 3 blocks an epoch: blocks 1, 3, 5 match; plain blocks in between
        ("blocks", [*ROCLIP, "--roclip-period-steps", "2"], 2),
    ],
)
def test_suspicious_rows_are_the_rows_of_the_step_that_matched(
    setup, monkeypatch, name, flags, epochs
) -> None:
    """Each margin of the CSV belongs to the sample whose image was matched, step by step."""
    recorder, margins = RecordAugmentations(), RecordMargins()
    _with_plugins(monkeypatch, recorder, margins)
    augment = ["--roclip-text-aug", "record", "--roclip-image-aug", "record"]
    assert main(_argv(setup, f"rows-{name}", epochs, *flags, *augment)) == 0
    steps_per_epoch = 96 // 16
    rows_of_step = {}  # global step -> dataset rows, in the order the loader gave them
    for epoch in range(epochs):
        rows = [k[2] for k in recorder.images if k[1] == epoch]
        for i in range(steps_per_epoch):
            rows_of_step[epoch * steps_per_epoch + i] = rows[16 * i : 16 * (i + 1)]
    folder = _ckpt(setup, f"rows-{name}", 1).parent
    written = sorted(folder.glob("suspicious_epoch_*.csv"))
    assert written
    for path in written:
        epoch = int(path.stem.rsplit("_", 1)[1]) - 1
        want = {
            row: margin
            for step, values in margins.steps
            if step // steps_per_epoch == epoch
            for row, margin in zip(rows_of_step[step], values, strict=True)
        }
        with path.open() as fh:
            got = {int(r["index"]): float(r["margin"]) for r in csv.DictReader(fh)}
        assert got.keys() == want.keys(), path.name
        assert all(abs(got[row] - want[row]) <= 1e-6 for row in want), path.name


@pytest.mark.parametrize(
    ("dataset_type", "augment"),
    [
        ("synthetic", []),  # the default augmentation: roclip images, eda captions
        ("synthetic", ["--roclip-image-aug", "none", "--roclip-text-aug", "none"]),
        ("auto", []),
    ],
    ids=["synthetic", "synthetic-no-aug", "auto"],
)
def test_every_dataset_type_trains_with_roclip(setup, dataset_type, augment) -> None:
    name = f"type-{dataset_type}-{len(augment)}"
    argv = _argv(setup, name, 1, *ROCLIP, "--roclip-first-defended-epoch", "0", *augment)
    argv[argv.index("csv")] = dataset_type
    if dataset_type == "synthetic":
        del argv[argv.index("--train-data") : argv.index("--train-data") + 2]
        argv += ["--train-num-samples", "48"]
    with pytest.warns(RuntimeWarning, match="holds"):  # pool 64 of 48 or 96 pairs
        assert main(argv) == 0
    assert re.findall(r"RoCLIP epoch 0 rank 0: matching=True pool=\d+/64", _log(setup, name))


def test_the_default_defends_on_synthetic_data(setup) -> None:
    """``--roclip`` alone (the robust preset) on OpenCLIP's synthetic dataset, which has no CSV
    rows: the sampler's indices are the sample ids, so the history score (which refuses a step
    without ids) defends the second epoch."""
    name = "type-synthetic-default"
    argv = _argv(setup, name, 2, "--roclip", "--roclip-pool-size", "64")
    argv[argv.index("csv")] = "synthetic"
    del argv[argv.index("--train-data") : argv.index("--train-data") + 2]
    argv += ["--train-num-samples", "48"]
    assert main(argv) == 0
    log = _log(setup, name)
    assert re.findall(r"RoCLIP epoch 0 rank 0: matching=False", log)
    assert re.findall(r"RoCLIP epoch 1 rank 0: matching=True pool=64/64", log)
