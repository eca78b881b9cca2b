"""Shared pieces of the OpenCLIP end-to-end tests: the data, the tiny model and the run helpers.

The data are real images (scikit-learn's handwritten digits, upscaled to 32x32 RGB) with
templated captions; the model is a tiny ViT from a local config (no download). The ``setup``,
``straight`` and ``evaluated`` fixtures (conftest.py) build them once per session.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn.datasets")

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


def build_setup(root: Path) -> dict[str, Path]:
    """96 digit images and their captions (a tab-separated CSV) and the tiny model, in ``root``."""
    from PIL import Image
    from sklearn import datasets as sklearn_datasets

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


def _validated(setup) -> list[str]:
    """RoCLIP with evaluation after every epoch (it draws from the global RNG) and latest."""
    validation = ["--val-data", str(setup["data"]), "--val-frequency", "1"]
    return [*ROCLIP, *validation, "--save-most-recent"]


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
