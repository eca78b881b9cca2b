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


ROCLIP = [
    "--roclip",
    "--roclip-rematch-every",
    "2",
    "--roclip-first-rematch-epoch",
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


def test_resume_after_epoch_two_is_exact(setup, monkeypatch) -> None:
    assert main(_argv(setup, "straight", 3, *ROCLIP)) == 0

    def with_interrupt():
        pm = get_plugin_manager()
        pm.register(StopAtEpochTwo())
        return pm

    with monkeypatch.context() as m:
        m.setattr(roclip_openclip.cli, "get_plugin_manager", with_interrupt)
        with pytest.raises(Interrupt):
            main(_argv(setup, "stopped", 3, *ROCLIP))
    assert not _ckpt(setup, "stopped", 3).exists()
    resume = ["--resume", str(_ckpt(setup, "stopped", 2))]
    assert main(_argv(setup, "stopped-resumed", 3, *ROCLIP, *resume)) == 0
    a = torch.load(_ckpt(setup, "straight", 3), weights_only=False)
    b = torch.load(_ckpt(setup, "stopped-resumed", 3), weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    pa = torch.load(state_path_for(_ckpt(setup, "straight", 3)), weights_only=False)
    pb = torch.load(state_path_for(_ckpt(setup, "stopped-resumed", 3)), weights_only=False)
    assert torch.equal(pa["roclip"]["pool"]["features"], pb["roclip"]["pool"]["features"])
    assert pa["roclip"]["step"] == pb["roclip"]["step"] == 18


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
        (["--accum-freq", "2"], "--accum-freq 2"),
        (["--siglip"], "--siglip"),
        (["--roclip-rematch-every", "0"], "rematch_every (--roclip-rematch-every): invalid"),
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
    argv = _argv(setup, "amp", 1, "--roclip", "--roclip-rematch-every", "0")
    argv[argv.index("fp32")] = "amp"
    main(argv)
    assert "--precision amp runs float16 on the CPU" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_ranks_share_one_pool(setup) -> None:
    """torchrun, OpenCLIP's own distributed set-up (gloo on CPU): the same pool on both ranks."""
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
        *_argv(setup, "torchrun", 2, *ROCLIP),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD", "LOCAL"))}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
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
    """WebDataset shards: RoCLIP trains; rows of the suspicious CSV carry no index (-1)."""
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
    from roclip_openclip.patches import STATE_FORMAT

    from roclip_plugin import RoClipConfig, RoClipDefense

    defense = RoClipDefense(RoClipConfig(pool_size=pool_size), plugin_manager=get_plugin_manager())
    defense.pool.enqueue(torch.nn.functional.normalize(torch.randn(4, 8), dim=-1))
    return {"format": STATE_FORMAT, "roclip": defense.state_dict(), "rng": []}


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
