"""roclip_kit.train.openclip: real OpenCLIP runs (child processes, CPU) on tiny captioned digits."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from roclip_kit.train.openclip import (  # noqa: E402
    PRESETS,
    TrainSettings,
    load_checkpoint,
    openclip_argv,
    train_openclip,
)

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {} written by hand."]
ROWS = 128
ROCLIP_FLAGS = {"defend_every": 1, "first_defended_epoch": 1, "pool_size": 64}


def _write_csv(path: Path, rows: list[tuple[str, str, int]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["filepath", "title", "label"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A captioned dataset directory in the kit's format: 128 train and 16 test digits."""
    from PIL import Image

    root = tmp_path_factory.mktemp("digits")
    (root / "images").mkdir()
    digits = sklearn_datasets.load_digits()
    rows = []
    for i in range(ROWS + 16):
        pixels = (digits.images[i] * (255 / 16)).astype("uint8")
        path = root / "images" / f"{i}.png"
        Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(path)
        label = int(digits.target[i])
        rows.append((str(path), TEMPLATES[i % 3].format(NAMES[label]), label))
    _write_csv(root / "train.csv", rows[:ROWS])
    _write_csv(root / "test.csv", rows[ROWS:])
    classes = {"dataset": "digits", "classes": NAMES, "templates": TEMPLATES, "synonyms": {}}
    (root / "classes.json").write_text(json.dumps(classes))
    return root


def _settings(dataset: Path, out: Path, name: str, **kw) -> TrainSettings:
    base = {"out_dir": out, "name": name, "dataset_dir": dataset, "batch_size": 32, "warmup": 1}
    return TrainSettings(**(base | kw))


@pytest.fixture(scope="module")
def roclip_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs")
    seen: list[tuple[int, Path]] = []
    settings = _settings(dataset, out, "roclip", epochs=2, roclip=True, roclip_flags=ROCLIP_FLAGS)
    result = train_openclip(settings, on_epoch=lambda e, p: seen.append((e, p)))
    return settings, result, seen


def test_roclip_run_saves_every_epoch_pool_and_suspicious_rows(roclip_run) -> None:
    settings, result, seen = roclip_run
    assert result.exit_code == 0 and result.wall_seconds > 0
    assert result.run_dir == settings.run_dir
    assert list(result.checkpoints) == [1, 2]
    assert all(p.is_file() and p.name == f"epoch_{e}.pt" for e, p in result.checkpoints.items())
    assert list(result.roclip_states) == [1, 2]
    state = torch.load(result.roclip_states[2], weights_only=False)
    assert len(state["roclip"]["pool"]["features"]) == 64  # 128 captions fill the 64-row pool
    assert list(result.suspicious) == [2]  # epoch 0 is the warm-up, epoch 1 (0-based) matches
    with result.suspicious[2].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == ROWS and {int(r["index"]) for r in rows} == set(range(ROWS))
    assert seen == list(result.checkpoints.items())
    assert "--roclip-defend-every" in result.argv and "fp32" in result.argv
    assert "Train Epoch: 1" in result.log_path.read_text()


def test_checkpoint_loads_back_through_the_model_name(roclip_run, dataset) -> None:
    _, result, _ = roclip_run
    assert result.model_name == f"local-dir:{(result.run_dir / 'model').resolve()}"
    model, preprocess, tokenizer = load_checkpoint(result.model_name, result.final_checkpoint)
    saved = torch.load(result.final_checkpoint, weights_only=False)["state_dict"]
    assert torch.equal(model.state_dict()["logit_scale"], saved["logit_scale"])
    tokens = tokenizer(["a photo of the digit one."])
    assert tokens.shape == (1, PRESETS["tiny-cpu"]["text_cfg"]["context_length"])
    from PIL import Image

    image = preprocess(Image.open(next((dataset / "images").glob("*.png"))))[None]
    with torch.no_grad():
        features = model.encode_image(image, normalize=True)
    assert features.shape == (1, PRESETS["tiny-cpu"]["embed_dim"])


def test_plain_run_has_no_roclip_files(dataset, tmp_path) -> None:
    result = train_openclip(_settings(dataset, tmp_path, "clip", epochs=1))
    assert list(result.checkpoints) == [1]
    assert result.roclip_states == {} and result.suspicious == {}
    assert "--roclip" not in result.argv
    assert "RoCLIP epoch" not in result.log_path.read_text()


def test_broken_dataset_raises_with_the_log_tail(dataset, tmp_path) -> None:
    broken = tmp_path / "broken.csv"
    _write_csv(
        broken, [(str(tmp_path / f"missing_{i}.png"), "a handwritten one.", 1) for i in range(8)]
    )
    settings = TrainSettings(
        out_dir=tmp_path, name="broken", train_csv=broken, batch_size=4, epochs=1
    )
    with pytest.raises(RuntimeError, match=r"'broken' failed \(exit code 1\)") as err:
        train_openclip(settings)
    # the exception first, then the tail of console.log (which holds the traceback)
    assert re.search(r"error: FileNotFoundError: .*missing_\d\.png", str(err.value))
    assert str(settings.run_dir / "console.log") in str(err.value)


def test_timeout_kills_the_run(dataset, tmp_path) -> None:
    settings = _settings(dataset, tmp_path, "slow", epochs=1, timeout_s=1)
    with pytest.raises(RuntimeError, match="timed out after 1 s"):
        train_openclip(settings)


def test_existing_run_is_not_overwritten(roclip_run) -> None:
    settings, _, _ = roclip_run
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_openclip(settings)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"train_csv": "x.csv"}, ValueError, "exactly one of dataset_dir and train_csv"),
        ({"roclip_flags": {"pool_size": 8}}, ValueError, "roclip_flags given with roclip=False"),
        ({"roclip": True, "roclip_flags": {"warmup_epochs": 1}}, ValueError, "warmup_epochs"),
        ({"roclip": True, "roclip_flags": {"pool_size": 0}}, ValueError, "--roclip-pool-size"),
        ({"precision": "amp"}, ValueError, "40x slower"),
        ({"extra_args": ["--epochs=3"]}, ValueError, "--epochs"),
        ({"extra_args": ["--roclip-seed", "1"]}, ValueError, "roclip_flags"),
        ({"preset": "huge"}, ValueError, "unknown model preset 'huge'"),
        ({"epochs": 0}, ValueError, "epochs: 0 must be an integer >= 1"),
        ({"device": "tpu"}, ValueError, "device: 'tpu'"),
        ({"name": "a/b"}, ValueError, "plain directory name"),
    ],
)
def test_bad_settings_are_refused_before_running(dataset, tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        _settings(dataset, tmp_path, change.pop("name", "bad"), **change)


def test_csv_without_caption_column_is_refused(tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("filepath\tcaption\n/x.png\thello\n")
    settings = TrainSettings(out_dir=tmp_path, name="bad", train_csv=bad)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['title'\]"):
        train_openclip(settings)
    assert not settings.run_dir.exists()


def test_argv_defaults_follow_the_device(dataset, tmp_path) -> None:
    cpu = _settings(dataset, tmp_path, "a")
    cuda = _settings(dataset, tmp_path, "b", device="cuda", roclip=True)
    assert cpu.resolved_precision == "fp32" and cuda.resolved_precision == "amp_bf16"
    argv = openclip_argv(cuda, "local-dir:/m")
    assert argv[argv.index("--precision") + 1] == "amp_bf16"
    assert argv[argv.index("--workers") + 1] == "4" and "--roclip" in argv
    assert argv[argv.index("--train-data") + 1] == str((dataset / "train.csv").resolve())
