"""Epoch checkpoints of the tensor path: a stopped and resumed run is the run that never stopped."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("open_clip")

from roclip_kit.train.tensor import TensorTrainSettings, train_tensor  # noqa: E402

from roclip_plugin import RoClipConfig  # noqa: E402
from roclip_plugin.io import StateError  # noqa: E402

from ..tiny import poisoned_digits  # noqa: E402

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "width": 16, "heads": 2, "layers": 1},
}
# Matching from the second epoch: the pool is full and used when the run stops after epoch 1.
MATCHING = {"pool_size": 48, "first_defended_epoch": 1, "defend_every": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    return poisoned_digits(tmp_path_factory.mktemp("tensor-checkpoint"))


def _settings(**changes: Any) -> TensorTrainSettings:
    base = {"epochs": 3, "batch_size": 32, "lr": 2e-3, "warmup_steps": 3, "seed": 3}
    return TensorTrainSettings(preset=TINY, grad_clip_norm=1.0, **{**base, **changes})


def _same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` equal bit for bit: tensors by ``torch.equal``, containers entry by entry."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN equals NaN here


def _figures(run: Any) -> list[dict[str, Any]]:
    """Each epoch's record without its wall time, and the suspicious file's rows, not its path
    (the two runs write to different folders)."""
    figures = []
    for record in run.epochs:
        entry = {k: v for k, v in asdict(record).items() if k != "seconds"}
        path = entry["audit"].pop("suspicious_file", None)
        entry["suspicious_rows"] = Path(path).read_text() if path else None
        figures.append(entry)
    return figures


@pytest.mark.parametrize(
    "config",
    [
        RoClipConfig(**MATCHING, image_aug="none", text_aug="none"),  # pool matching
        RoClipConfig.from_preset("robust", **MATCHING, image_aug="roclip-small", text_aug="eda"),
    ],
    ids=["paper-pool", "robust-history-augmented"],
)
def test_a_run_stopped_and_resumed_equals_the_run_that_never_stopped(
    data, tmp_path: Path, config: RoClipConfig
) -> None:
    settings = _settings()
    straight = train_tensor(data, settings, config, run_dir=tmp_path / "straight")
    split_dir, checkpoints = tmp_path / "split", tmp_path / "split" / "checkpoints"
    first = train_tensor(
        data, settings, config, run_dir=split_dir, checkpoint_dir=checkpoints, stop_after=1
    )
    assert len(first.epochs) == 1 and (checkpoints / "epoch_1.pt").is_file()
    torch.manual_seed(12345)  # whatever this process drew since: the checkpoint's states rule
    resumed = train_tensor(
        data, settings, config, run_dir=split_dir, checkpoint_dir=checkpoints, resume=True
    )
    assert [r.epoch for r in resumed.epochs] == [0, 1, 2]
    assert resumed.defended_epochs == straight.defended_epochs == [2, 3]
    _same(resumed.model.state_dict(), straight.model.state_dict(), "model")
    _same(resumed.roclip_state, straight.roclip_state, "roclip")
    assert _figures(resumed) == _figures(straight)
    assert sorted(resumed.suspicious) == sorted(straight.suspicious) == [2, 3]


def test_a_defended_run_without_a_run_dir_resumes(data, tmp_path: Path) -> None:
    """Its defended epochs' records say no suspicious file was written: resume reads none."""
    settings = _settings(epochs=3)
    config = RoClipConfig(**MATCHING, image_aug="none", text_aug="none")
    first = train_tensor(data, settings, config, checkpoint_dir=tmp_path, stop_after=2)
    assert first.defended_epochs == [2] and not first.suspicious
    resumed = train_tensor(data, settings, config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.defended_epochs == [2, 3] and not resumed.suspicious


def test_checkpoints_are_kept_as_asked_and_a_finished_run_resumes_to_itself(
    data, tmp_path: Path
) -> None:
    settings = _settings(epochs=2)
    run = train_tensor(data, settings, None, checkpoint_dir=tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_2.pt"]
    again = train_tensor(data, settings, None, checkpoint_dir=tmp_path, resume=True)
    _same(again.model.state_dict(), run.model.state_dict(), "model")
    assert [asdict(r) for r in again.epochs] == [asdict(r) for r in run.epochs]


def _refusal(data, settings: TensorTrainSettings, folder: Path, **options: Any) -> str:
    with pytest.raises(ValueError) as caught:
        train_tensor(data, settings, None, checkpoint_dir=folder, resume=True, **options)
    message = str(caught.value)
    assert "\n" not in message  # one line: the problem, then the fix
    return message


def test_resume_from_no_checkpoint_is_refused_with_the_fix(data, tmp_path: Path) -> None:
    message = _refusal(data, _settings(), tmp_path)
    assert isinstance(message, str) and "holds no epoch_<N>.pt checkpoint" in message
    assert "start without resume" in message
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        train_tensor(data, _settings(), None, resume=True)
    with pytest.raises(ValueError, match="stop_after=0 must be None or >= 1"):
        train_tensor(data, _settings(), None, stop_after=0)


def test_resume_from_another_programs_checkpoint_is_refused(data, tmp_path: Path) -> None:
    torch.save({"format": "roclip_torch.loop/1", "model": {}}, tmp_path / "epoch_3.pt")
    message = _refusal(data, _settings(), tmp_path)
    assert "epoch_3.pt is not a tensor-path checkpoint (format 'roclip_torch.loop/1'" in message
    (tmp_path / "epoch_4.pt").write_bytes(b"not a torch file")
    with pytest.raises(StateError, match="epoch_4.pt cannot be read"):
        train_tensor(data, _settings(), None, checkpoint_dir=tmp_path, resume=True)


def test_resume_with_other_settings_or_defense_is_refused(data, tmp_path: Path) -> None:
    settings = _settings(epochs=2)
    train_tensor(data, settings, None, checkpoint_dir=tmp_path, stop_after=1)
    message = _refusal(data, _settings(epochs=2, lr=1e-3), tmp_path)
    assert "belongs to another run (settings.lr: 0.002 -> 0.001)" in message
    assert "use a new checkpoint_dir" in message
    with pytest.raises(StateError, match=r"defend: False -> True; roclip: None -> \{"):
        train_tensor(
            data,
            settings,
            RoClipConfig(**MATCHING, image_aug="none", text_aug="none"),
            checkpoint_dir=tmp_path,
            resume=True,
        )
    # where and how fast it trains is not what it trains: a thread count may change
    resumed = train_tensor(
        data, _settings(epochs=2, threads=torch.get_num_threads()), None,
        checkpoint_dir=tmp_path, resume=True,
    )  # fmt: skip
    assert len(resumed.epochs) == 2


def test_resume_on_other_data_is_refused(data, tmp_path: Path) -> None:
    settings = _settings(epochs=2)
    train_tensor(data, settings, None, checkpoint_dir=tmp_path, stop_after=1)
    fingerprint = r"another run \(data\.captions_sha256: .*data\.rows: 168 -> 156"
    with pytest.raises(StateError, match=fingerprint):
        train_tensor(data.without_poison(), settings, None, checkpoint_dir=tmp_path, resume=True)


def test_on_weights_sees_every_step_counted_across_a_resume(data, tmp_path: Path) -> None:
    """A trace of the weights between epoch ends: the resumed run's steps count on from its
    checkpoint and carry the weights the run that never stopped had at that step."""
    settings = _settings()
    steps = len(data.train) // settings.batch_size

    def recorder(into: dict[int, torch.Tensor]):
        def record(step: int, model: torch.nn.Module) -> None:
            into[step] = model.logit_scale.detach().clone()  # one tensor that moves every step

        return record

    straight: dict[int, torch.Tensor] = {}
    train_tensor(data, settings, None, on_weights=recorder(straight))
    assert sorted(straight) == list(range(1, settings.epochs * steps + 1))
    traced: dict[int, torch.Tensor] = {}
    checkpoints = tmp_path / "checkpoints"
    train_tensor(
        data, settings, None, checkpoint_dir=checkpoints, stop_after=1, on_weights=recorder({})
    )
    train_tensor(
        data, settings, None, checkpoint_dir=checkpoints, resume=True, on_weights=recorder(traced)
    )
    assert sorted(traced) == list(range(steps + 1, settings.epochs * steps + 1))
    assert all(torch.equal(traced[s], straight[s]) for s in traced)
    assert len({float(v) for v in straight.values()}) > 1  # the recorded tensor does move
