"""Argument checks of the loss and the defense (roclip_plugin.validation), called from Python."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager
from roclip_plugin.loss import DistInfo
from roclip_plugin.validation import as_integer, as_real, check_device


def _defense(**kw) -> RoClipDefense:
    config = RoClipConfig.from_preset("paper", pool_size=32, first_defended_epoch=0, defend_every=1)
    return RoClipDefense(config, plugin_manager=get_plugin_manager(), dist_info=DistInfo(), **kw)


def _unit(batch: int, dim: int = 8) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim), dim=-1)


def _matching_defense() -> RoClipDefense:
    defense = _defense()
    defense.start_epoch(0)
    defense.pool.enqueue(_unit(16))
    assert defense.matching
    return defense


@pytest.mark.parametrize("matching", [False, True])
def test_batch_mismatch_is_refused_on_every_kind_of_step(matching: bool) -> None:
    defense = _matching_defense() if matching else _defense()
    with pytest.raises(ValueError, match="image_features has 8 rows but text_features has 6"):
        defense.loss(_unit(8), _unit(6), torch.tensor(10.0))


@pytest.mark.parametrize(
    ("image", "text", "scale", "error", "match"),
    [
        ("nan", "ok", 10.0, ValueError, "image_features: 1 of 6 image feature rows are non-finite"),
        ("inf", "ok", 10.0, ValueError, "image_features: 1 of 6 image feature rows are non-finite"),
        ("ok", "nan", 10.0, ValueError, "text_features: 1 of 6 text feature rows are non-finite"),
        ("ok", "inf", 10.0, ValueError, "text_features: 1 of 6 text feature rows are non-finite"),
        ("x100", "ok", 10.0, ValueError, "image_features: rows are not L2-normalised"),
        ("zero", "ok", 10.0, ValueError, "image_features: rows are not L2-normalised"),
        ("ok", "x100", 10.0, ValueError, "text_features: rows are not L2-normalised"),
        ("ok", "ok", -3.0, ValueError, "logit_scale: invalid value -3.0"),
        ("ok", "ok", 0.0, ValueError, "logit_scale: invalid value 0.0"),
        ("ok", "ok", math.inf, ValueError, "logit_scale: invalid value inf"),
        ("ok", "ok", "vector", ValueError, r"logit_scale: expected a scalar .* shape \(3,\)"),
        ("ok", "ok", "parameter", ValueError, r"logit_scale\.exp\(\)"),
        ("ok", "ok", "text", TypeError, "logit_scale: expected a scalar tensor or a number"),
        ("list", "ok", 10.0, TypeError, "image_features: expected a torch.Tensor"),
        ("3d", "ok", 10.0, ValueError, r"image_features: expected shape \[batch, dim\]"),
        ("int", "ok", 10.0, ValueError, "image_features: dtype torch.int64 is not"),
        ("ok", "wide", 10.0, ValueError, "image_features has dim 8 but text_features dim 9"),
        ("empty", "empty", 10.0, ValueError, "image_features: empty tensor"),
    ],
)
@pytest.mark.parametrize("matching", [False, True])
def test_bad_loss_arguments_name_the_argument(image, text, scale, error, match, matching) -> None:
    def features(kind: str) -> object:
        base = _unit(6)
        return {
            "ok": base,
            "nan": base.index_fill(0, torch.tensor([2]), math.nan),
            "inf": base.index_fill(0, torch.tensor([1]), math.inf),
            "x100": base * 100,
            "zero": torch.zeros(6, 8),
            "list": base.tolist(),
            "3d": base.reshape(6, 2, 4),
            "int": torch.ones(6, 8, dtype=torch.int64),
            "wide": _unit(6, 9),
            "empty": torch.zeros(0, 8),
        }[kind]

    logit_scale = {
        "vector": torch.ones(3),
        "parameter": torch.nn.Parameter(torch.tensor(math.log(1 / 0.07))),
        "text": "14",
    }.get(scale, torch.tensor(scale) if isinstance(scale, float) else scale)
    defense = _matching_defense() if matching else _defense()
    with pytest.raises(error, match=match):
        defense.loss(features(image), features(text), logit_scale)
    assert defense.step == 0  # a refused call is no step


def test_zero_captions_are_left_to_the_pool() -> None:
    """The pool refuses zero rows with a warning (its policy); the loss does not raise."""
    txt = _unit(6)
    txt[2] = 0.0
    defense = _defense()
    with pytest.warns(RuntimeWarning, match="refused 1 caption"):
        defense.loss(_unit(6), txt, torch.tensor(10.0))
    assert len(defense.pool) == 5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_caption_row_is_refused_and_nothing_enters_the_pool(bad: float) -> None:
    """As the README says: non-finite features are refused, captions as well as images."""
    txt = _unit(6)
    txt[3, 1] = bad
    defense = _defense()
    with pytest.raises(ValueError, match="text_features: 1 of 6 text feature rows are non-finite"):
        defense.loss(_unit(6), txt, torch.tensor(10.0))
    assert len(defense.pool) == 0 and defense.pool.rejected == 0


def test_rounding_of_bf16_normalised_features_passes() -> None:
    """OpenCLIP normalises under autocast: bf16 rows differ from unit norm by rounding."""
    img = _unit(64, 512).bfloat16()
    txt = _unit(64, 512).bfloat16()
    loss = _defense().loss(img, txt, torch.tensor(14.3))
    assert torch.isfinite(loss)


def test_python_number_scale_and_a_float_tensor_are_accepted() -> None:
    defense = _defense()
    assert torch.isfinite(defense.loss(_unit(4), _unit(4), 14.0))
    assert torch.isfinite(defense.loss(_unit(4), _unit(4), torch.tensor([14.0])))


def test_values_are_read_only_on_first_and_matching_steps_off_the_cpu(monkeypatch) -> None:
    """No extra GPU sync on plain steps: the value check runs once, then on matching steps."""
    from roclip_plugin import validation

    counted = []
    check = validation.LossInputCheck()
    meta = torch.empty(4, 8, device="meta")
    # meta tensors stand in for a GPU: every non-CPU device skips the per-step read
    monkeypatch.setattr(check, "_check_values", lambda *a: counted.append(1))
    for _ in range(3):
        check(meta, meta, torch.tensor(10.0), matching=False)
    check(meta, meta, torch.tensor(10.0), matching=True)
    assert len(counted) == 2  # the first call and the matching one


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_epochs": -1}, "total_epochs: invalid value -1"),
        ({"total_epochs": "10"}, "total_epochs: invalid value '10'"),
        ({"total_epochs": 0}, "total_epochs: invalid value 0"),
        ({"steps_per_epoch": 2.5}, "steps_per_epoch: invalid value 2.5"),
        ({"total_epochs": True}, "total_epochs: invalid value True"),
    ],
)
def test_run_length_is_checked(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _defense(**kwargs)


def test_run_length_accepts_numpy_integers() -> None:
    defense = _defense(total_epochs=np.int64(10), steps_per_epoch=torch.tensor(7))
    assert (defense.total_epochs, defense.steps_per_epoch) == (10, 7)
    assert type(defense.total_epochs) is int


def test_start_epoch_names_the_epoch() -> None:
    with pytest.raises(ValueError, match=r"epoch: invalid value -1; allowed: an integer >= 0"):
        _defense().start_epoch(-1)
    with pytest.raises(ValueError, match="epoch: invalid value 1.0"):
        _defense().start_epoch(1.0)


def test_number_helpers() -> None:
    assert as_integer(np.int32(3)) == 3 and as_integer(torch.tensor(4)) == 4
    assert as_integer(True) is None and as_integer(3.0) is None
    assert as_integer(torch.tensor(4.0)) is None and as_integer(torch.ones(2)) is None
    assert as_real(np.float32(0.5)) == 0.5 and as_real(torch.tensor(0.25)) == 0.25
    assert as_real(np.bool_(True)) is None and as_real(1j) is None


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("bogus", "--device 'bogus' is not a torch device"),
        ("", "is not a torch device"),
    ],
)
def test_check_device_refuses_what_torch_cannot_use(device, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_check_device_without_a_gpu() -> None:
    with pytest.raises(ValueError, match="--device cuda:1: no CUDA device is visible"):
        check_device("cuda:1")
    assert check_device("cpu") == "cpu"
