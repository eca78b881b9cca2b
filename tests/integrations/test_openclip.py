"""End to end: OpenCLIP's real training script with ``--roclip`` on a tiny model, on the CPU.

The data are real images (scikit-learn's handwritten digits, upscaled to 32x32 RGB) with
templated captions; the model is a tiny ViT from a local config (no download).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

import roclip_openclip.cli  # noqa: E402
from roclip_openclip import main  # noqa: E402
from roclip_openclip.patches import state_path_for  # noqa: E402

from roclip_plugin import get_plugin_manager, hookimpl  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}", "a handwritten {}", "the number {} written by hand"]
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("openclip")
    digits = sklearn_datasets.load_digits()
    rows = []
    for i in range(96):
        pixels = (digits.images[i] * (255 / 16)).astype("uint8")
        image = Image.fromarray(pixels).resize((32, 32)).convert("RGB")
        path = root / f"img_{i}.png"
        image.save(path)
        caption = TEMPLATES[i % len(TEMPLATES)].format(NAMES[int(digits.target[i])])
        rows.append((str(path), caption))
    data = root / "train.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    model_dir = root / "tiny"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    return {"root": root, "data": data, "model": model_dir}


def _argv(setup: dict[str, Path], name: str, epochs: int, *extra: str) -> list[str]:
    return [
        "--train-data",
        str(setup["data"]),
        "--dataset-type",
        "csv",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        f"local-dir:{setup['model']}",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--batch-size",
        "16",
        "--epochs",
        str(epochs),
        "--workers",
        "0",
        "--warmup",
        "1",
        "--lr",
        "1e-3",
        "--seed",
        "0",
        "--logs",
        str(setup["root"] / "logs"),
        "--name",
        name,
        "--save-frequency",
        "1",
        "--report-to",
        "",
        *extra,
    ]


def _log(setup: dict[str, Path], name: str) -> str:
    return (setup["root"] / "logs" / name / "out.log").read_text()


def _ckpt(setup: dict[str, Path], name: str, epoch: int) -> Path:
    return setup["root"] / "logs" / name / "checkpoints" / f"epoch_{epoch}.pt"


ROCLIP = [  # the paper's matching: these tests follow its pool and matching epochs
    "--roclip",
    "--roclip-preset",
    "paper",
    "--roclip-defend-every",
    "2",
    "--roclip-first-defended-epoch",
    "1",
    "--roclip-pool-size",
    "64",
]


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


class Interrupt(Exception):
    pass


class StopAtEpochTwo:
    """A plugin that kills the run as epoch 2 starts (after epoch 2's checkpoint)."""

    @hookimpl
    def roclip_epoch_start(self, epoch):
        if epoch == 2:
            raise Interrupt


def _stop_after_epoch_two(argv: list[str]) -> None:
    """Run ``argv`` and kill it as epoch 2 starts, after epoch 2's checkpoint (and evaluation)."""

    def with_interrupt():
        pm = get_plugin_manager()
        pm.register(StopAtEpochTwo())
        return pm

    with pytest.MonkeyPatch.context() as m:
        m.setattr(roclip_openclip.cli, "get_plugin_manager", with_interrupt)
        with pytest.raises(Interrupt):
            main(argv)


def _assert_same_run(setup, name_a: str, name_b: str, epoch: int = 3) -> None:
    """Identical weights and caption pool after ``epoch`` epochs."""
    a = torch.load(_ckpt(setup, name_a, epoch), weights_only=False)
    b = torch.load(_ckpt(setup, name_b, epoch), weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    pa = torch.load(state_path_for(_ckpt(setup, name_a, epoch)), weights_only=False)
    pb = torch.load(state_path_for(_ckpt(setup, name_b, epoch)), weights_only=False)
    assert torch.equal(pa["roclip"]["pool"]["features"], pb["roclip"]["pool"]["features"])
    assert pa["roclip"]["step"] == pb["roclip"]["step"] == 6 * epoch


@pytest.fixture(scope="module")
def straight(setup) -> str:
    """An uninterrupted 3-epoch RoCLIP run, batch 16 (six steps an epoch)."""
    assert main(_argv(setup, "straight", 3, *ROCLIP)) == 0
    return "straight"


def test_resume_after_epoch_two_is_exact(setup, straight) -> None:
    _stop_after_epoch_two(_argv(setup, "stopped", 3, *ROCLIP))
    assert not _ckpt(setup, "stopped", 3).exists()
    resume = ["--resume", str(_ckpt(setup, "stopped", 2))]
    assert main(_argv(setup, "stopped-resumed", 3, *ROCLIP, *resume)) == 0
    _assert_same_run(setup, "straight", "stopped-resumed")


def _validated(setup) -> list[str]:
    """RoCLIP with evaluation after every epoch (it draws from the global RNG) and latest."""
    validation = ["--val-data", str(setup["data"]), "--val-frequency", "1"]
    return [*ROCLIP, *validation, "--save-most-recent"]


@pytest.fixture(scope="module")
def evaluated(setup) -> str:
    """An uninterrupted 3-epoch run with evaluation, and the same run stopped after epoch 2."""
    assert main(_argv(setup, "val-straight", 3, *_validated(setup))) == 0
    _stop_after_epoch_two(_argv(setup, "val-stopped", 3, *_validated(setup)))
    return "val-straight"


def test_resume_is_exact_when_openclip_evaluates_between_epochs(setup, evaluated) -> None:
    resume = ["--resume", str(_ckpt(setup, "val-stopped", 2))]
    assert main(_argv(setup, "val-resumed", 3, *_validated(setup), *resume)) == 0
    _assert_same_run(setup, evaluated, "val-resumed")
    state = torch.load(state_path_for(_ckpt(setup, "val-stopped", 2)), weights_only=False)
    assert (state["completed_epochs"], state["step"]) == (2, 12)


class Crash(Exception):
    pass


def _crash_in_evaluation(monkeypatch) -> None:
    import open_clip_train.main as oc_main

    evaluate = oc_main.evaluate

    def crashing(model, data, epoch, args, **kw):
        if epoch == 2:
            raise Crash
        return evaluate(model, data, epoch, args, **kw)

    monkeypatch.setattr(oc_main, "evaluate", crashing)


def _crash_replacing_the_second_latest(monkeypatch) -> None:
    import os

    replace, seen = os.replace, []

    def crashing(src, dst):
        if str(dst).endswith("epoch_latest.pt"):
            seen.append(dst)
            if len(seen) == 2:  # epoch_2.pt is written, epoch_latest.pt still holds epoch 1
                raise Crash
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing)


@pytest.mark.parametrize(
    "crash", [_crash_in_evaluation, _crash_replacing_the_second_latest], ids=["eval", "latest"]
)
def test_a_crash_at_any_point_leaves_a_consistent_pair(setup, evaluated, crash) -> None:
    """--resume latest after a crash restores the pool of the epoch OpenCLIP's file holds."""
    name = f"crash-{crash.__name__}"
    with pytest.MonkeyPatch.context() as m:
        crash(m)
        with pytest.raises(Crash):
            main(_argv(setup, name, 3, *_validated(setup)))
    latest = torch.load(_ckpt(setup, name, 1).with_name("epoch_latest.pt"), weights_only=False)
    assert latest["epoch"] == 1
    assert main(_argv(setup, name, 3, *_validated(setup), "--resume", "latest")) == 0
    _assert_same_run(setup, evaluated, name)
    folder = _ckpt(setup, name, 1).parent
    states = {p.stem for p in folder.glob("*.roclip")}
    assert states == {f"epoch_{n}" for n in (1, 2, 3)}  # one per epoch_N.pt, no orphan


def test_a_state_from_another_epoch_is_refused(setup, evaluated, capsys) -> None:
    import shutil

    folder = setup["root"] / "mismatch"
    folder.mkdir()
    shutil.copy(_ckpt(setup, "val-stopped", 2), folder / "epoch_2.pt")
    shutil.copy(state_path_for(_ckpt(setup, "val-stopped", 1)), folder / "epoch_2.roclip")
    resume = ["--resume", str(folder / "epoch_2.pt")]
    assert main(_argv(setup, "mismatch", 3, *_validated(setup), *resume)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{folder / 'epoch_2.roclip'} holds the state after epoch 1 (step 6)" in err
    assert f"the checkpoint {folder / 'epoch_2.pt'} is at epoch 2" in err
    assert not _ckpt(setup, "mismatch", 3).exists()


def test_resume_from_a_remote_checkpoint_reads_the_state_from_the_same_file_system(
    setup, evaluated
) -> None:
    """OpenCLIP loads --resume through fsspec (s3://...): the RoCLIP state comes the same way."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for name in ("epoch_2.pt", "epoch_2.roclip"):
        fs.pipe(f"/remote/{name}", _ckpt(setup, "val-stopped", 2).with_name(name).read_bytes())
    resume = ["--resume", "memory://remote/epoch_2.pt"]
    try:
        assert main(_argv(setup, "remote-resumed", 3, *_validated(setup), *resume)) == 0
    finally:
        fs.rm("/remote", recursive=True)
    _assert_same_run(setup, evaluated, "remote-resumed")


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


def _fake_resume(setup: dict[str, Path], name: str, state: object) -> Path:
    """A checkpoint path whose ``.roclip`` state file holds ``state`` (bytes or an object)."""
    folder = setup["root"] / "resume-states" / name
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "epoch_2.pt"
    checkpoint.write_bytes(b"never read: the RoCLIP state is refused first")
    if isinstance(state, bytes):
        state_path_for(checkpoint).write_bytes(state)
    else:
        torch.save(state, state_path_for(checkpoint))
    return checkpoint


def _saved_state(pool_size: int) -> dict:
    from roclip_openclip.state import STATE_FORMAT

    from roclip_plugin import RoClipConfig, RoClipDefense

    defense = RoClipDefense(RoClipConfig(pool_size=pool_size), plugin_manager=get_plugin_manager())
    defense.pool.enqueue(torch.nn.functional.normalize(torch.randn(4, 8), dim=-1))
    saved = {"completed_epochs": 2, "step": 12, "roclip": defense.state_dict(), "rng": []}
    return {"format": STATE_FORMAT, **saved}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (b"", "is empty"),
        (b"\x80\x04 truncated pickle", "cannot be read"),
        ("pool-8", "checkpoint pool size 8 differs from this pool's 64; resume with the same"),
        ("no-rng", "lacks 'rng'"),
        ("nan-pool", "row(s) hold NaN or inf"),
    ],
)
def test_bad_resume_state_stops_before_training(setup, capsys, state, message) -> None:
    content: object = state
    if state == "pool-8":
        content = _saved_state(8)
    elif state == "no-rng":
        content = {k: v for k, v in _saved_state(64).items() if k != "rng"}
    elif state == "nan-pool":
        content = _saved_state(64)
        content["roclip"]["pool"]["features"][0, 0] = float("nan")
    checkpoint = _fake_resume(setup, str(abs(hash(str(state)))), content)
    name = f"resume-{abs(hash(str(state)))}"
    assert main(_argv(setup, name, 3, *ROCLIP, "--resume", str(checkpoint))) == 2
    err = capsys.readouterr().err
    assert f"roclip-openclip-train: error: --resume {checkpoint}: " in err and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (setup["root"] / "logs" / name).exists()


def test_help_into_a_closed_pipe_is_quiet(monkeypatch) -> None:
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr(roclip_openclip.cli, "detach_stdout", lambda: None)
    assert main(["--help"]) == 141


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


def _local_model(setup, name: str, cfg: dict) -> str:
    folder = setup["root"] / name
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{folder}"


def test_a_coca_model_is_refused_whatever_its_name(setup, capsys) -> None:
    """Detected from the model (open_clip.CoCa), not from "coca" in --model."""
    text = {**MODEL_CFG["text_cfg"], "layers": 1, "embed_cls": True, "output_tokens": True}
    vision = {
        **MODEL_CFG["vision_cfg"],
        "layers": 1,
        "attentional_pool": True,
        "attn_pooler_heads": 2,
        "output_tokens": True,
    }
    multimodal = {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 1,
        "attn_pooler_heads": 2,
    }
    cfg = {
        "embed_dim": 64,
        "vision_cfg": vision,
        "text_cfg": text,
        "multimodal_cfg": multimodal,
        "custom_text": True,
    }
    argv = _argv(setup, "captioner", 2, *ROCLIP)
    argv[argv.index(f"local-dir:{setup['model']}")] = _local_model(setup, "captioner", cfg)
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is a CoCa model (open_clip.CoCa)" in err
    assert not _ckpt(setup, "captioner", 1).exists()


def test_a_siglip_architecture_without_siglip_trains_like_clip_loss(setup) -> None:
    """A logit_bias in the model, no --siglip: OpenCLIP's ClipLoss adds it to every logit."""
    cfg = {**MODEL_CFG, "init_logit_bias": -10.0}
    argv = _argv(setup, "bias", 2, *ROCLIP)
    argv[argv.index(f"local-dir:{setup['model']}")] = _local_model(setup, "bias", cfg)
    with pytest.warns(RuntimeWarning, match="holds"):
        assert main(argv) == 0
    log = _log(setup, "bias")
    assert "has a logit_bias (a SigLIP architecture) and --siglip is not given" in log
    assert re.findall(r"RoCLIP epoch 1 rank 0: matching=True pool=64/64", log)
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+)", log)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


# -- SigLIP (--siglip) -------------------------------------------------------------------------

SIGMOID_CFG = {**MODEL_CFG, "init_logit_bias": -10.0, "init_logit_scale": 2.3}


def _siglip_argv(setup, name: str, epochs: int, *extra: str) -> list[str]:
    """--siglip on a tiny model with a logit bias (its folder name must not say "siglip":
    OpenCLIP would then ask Hugging Face for SigLIP's tokenizer)."""
    argv = _argv(setup, name, epochs, *ROCLIP, "--siglip", *extra)
    argv[argv.index(f"local-dir:{setup['model']}")] = _local_model(setup, "sigmoid", SIGMOID_CFG)
    return argv


def test_siglip_trains_with_roclip_reports_and_resumes_exactly(setup) -> None:
    """The sigmoid loss end to end: schedule, pool, suspicious CSV, a trained bias, resume."""
    assert main(_siglip_argv(setup, "siglip", 3)) == 0
    log = _log(setup, "siglip")
    assert "--siglip is not given" not in log
    matching = re.findall(r"RoCLIP epoch (\d+) rank 0: matching=(\w+) pool=(\d+)/64", log)
    assert [(int(e), m, int(f)) for e, m, f in matching] == [
        (0, "False", 64),
        (1, "True", 64),
        (2, "False", 64),
    ]
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+)", log)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    weights = torch.load(_ckpt(setup, "siglip", 3), weights_only=False)["state_dict"]
    assert float(weights["logit_bias"]) != -10.0  # the sigmoid loss trains the bias
    with _ckpt(setup, "siglip", 2).with_name("suspicious_epoch_2.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 96 and {int(r["index"]) for r in rows} == set(range(96))

    _stop_after_epoch_two(_siglip_argv(setup, "siglip-stopped", 3))
    resume = ["--resume", str(_ckpt(setup, "siglip-stopped", 2))]
    assert main(_siglip_argv(setup, "siglip-resumed", 3, *resume)) == 0
    _assert_same_run(setup, "siglip", "siglip-resumed")


# -- gradient accumulation (--accum-freq) ------------------------------------------------------

ACCUM = ["--batch-size", "8", "--accum-freq", "2"]


def _suspicious(setup, name: str, epoch: int) -> dict[int, float]:
    with _ckpt(setup, name, epoch).with_name(f"suspicious_epoch_{epoch}.csv").open() as fh:
        return {int(r["index"]): float(r["margin"]) for r in csv.DictReader(fh)}


def _without_key_bias(weights: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A weight, with the attention's key bias left out (the middle third of in_proj_bias).

    Softmax attention does not change when a query's scores all move by the same constant, so
    the key bias has no gradient in exact arithmetic: what it receives is rounding noise, which
    AdamW scales up to full-size steps. That noise differs as soon as the sums are taken in
    another order (two micro-batches instead of one batch), so the key bias is the one weight
    two such runs cannot share, with or without RoCLIP. Every other weight agrees to ~1e-6.
    """
    value = weights[key]
    if key.endswith("attn.in_proj_bias"):
        third = value.shape[0] // 3
        value = torch.cat([value[:third], value[2 * third :]])
    return value


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


def test_the_csv_rows_of_a_step_become_its_sample_ids() -> None:
    """The loss's pre-hook hands the step's dataset rows to the per-sample history."""
    import torch
    from roclip_openclip.patches import EpochReport

    class _Loss:
        call_in_step = 0
        pending_ids = None

    report = EpochReport(margin_threshold=0.2)
    report.indices.extend([7, 3, 9, 1, 4])
    loss = _Loss()
    report.before_loss(loss, (), {"image_features": torch.zeros(3, 4)})
    assert loss.pending_ids.tolist() == [7, 3, 9]
    report.indices.clear()  # a data path with no rows (WebDataset): no ids are made up
    loss.pending_ids = None
    report.before_loss(loss, (), {"image_features": torch.zeros(2, 4)})
    assert loss.pending_ids is None


def test_the_webdataset_keys_of_a_step_become_its_sample_ids() -> None:
    """A WebDataset step's ``__key__`` values are hashed to the history's ids, and the
    suspicious rows keep key and caption (its row index is unknown: -1)."""
    import torch
    from roclip_openclip.patches import EpochReport

    from roclip_plugin.loss import MatchStats
    from roclip_plugin.risk import stable_ids
    from roclip_plugin.stats import SuspiciousRow

    class _Loss:
        call_in_step = 0
        pending_ids = None

    report = EpochReport(margin_threshold=0.2)
    report.indices.extend([("a/001", "a cat"), ("a/002", "a dog"), ("b/001", "a car")])
    loss = _Loss()
    report.before_loss(loss, (), {"image_features": torch.zeros(2, 4)})
    assert loss.pending_ids.tolist() == stable_ids(["a/001", "a/002"]).tolist()
    margins = torch.tensor([0.25, 0.5])
    zeros = torch.zeros(2, dtype=torch.long)
    report.stats.roclip_after_match(
        MatchStats(0, 0, 4, 8, 0.0, 0.0, margins, zeros, ids=loss.pending_ids)
    )
    assert report.top_rows() == [
        SuspiciousRow(-1, "a/002", "a dog", 0.5),
        SuspiciousRow(-1, "a/001", "a cat", 0.25),
    ]


def test_keyed_batches_take_keys_off_each_batch_in_order() -> None:
    from collections import deque

    from roclip_openclip.patches import KeyedBatches

    class _Loader(list):
        num_batches = 2

    loader = _Loader([("i0", "t0", ["k0", "k1"], ["c0", "c1"]), ("i1", "t1", ["k2"], ["c2"])])
    queue: deque = deque()
    batches = KeyedBatches(loader, queue)
    assert batches.num_batches == 2 and len(batches) == 2
    seen = []
    for images, texts in batches:
        seen.append((images, texts, list(queue)))
    assert seen[0] == ("i0", "t0", [("k0", "c0"), ("k1", "c1")])
    assert seen[1][2][-1] == ("k2", "c2")
