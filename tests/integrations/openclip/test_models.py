"""The model and loss OpenCLIP builds: a CoCa model is refused whatever its name, a SigLIP
architecture (a logit bias) without ``--siglip`` trains with CLIP's loss, and ``--siglip``
trains with RoCLIP end to end (schedule, pool, suspicious CSV, a trained bias, exact resume).
"""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn.datasets")

from roclip_openclip import main  # noqa: E402

from .runs import (  # noqa: E402
    MODEL_CFG,
    ROCLIP,
    _argv,
    _assert_same_run,
    _ckpt,
    _log,
    _stop_after_epoch_two,
)


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
