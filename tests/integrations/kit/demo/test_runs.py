"""Runs as jobs: every run that finishes is reported, whatever happens to the others."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("open_clip")

from roclip_kit.attack.poison import poison_dataset  # noqa: E402
from roclip_kit.data.datasets import build_captioned_dataset  # noqa: E402
from roclip_kit.demo.runs import RunsFailed, RunSpec, run_spec, run_specs  # noqa: E402
from roclip_kit.train.tensor import TensorTrainSettings  # noqa: E402

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "width": 16, "heads": 2, "layers": 1},
}


def test_a_failing_run_does_not_stop_or_hide_the_others(tmp_path: Path) -> None:
    build_captioned_dataset("digits", tmp_path / "d", seed=0, train_limit=64, test_limit=20)
    poisoned = poison_dataset(
        tmp_path / "p", dataset_dir=tmp_path / "d", targets=2, captions_per_target=2
    ).out_dir
    train = TensorTrainSettings(epochs=1, batch_size=32, preset=TINY)
    good = RunSpec("CLIP", poisoned, None, train, None, tmp_path / "runs" / "clip", eval_limit=10)
    bad = RunSpec("broken", tmp_path / "missing", None, train, None, tmp_path / "runs" / "x")
    finished = []
    with pytest.raises(RunsFailed, match=r"1 of 2 runs failed: broken .*--dataset"):
        run_specs([bad, good], 1, on_result=lambda i, r: finished.append((i, r["name"])))
    assert finished == [(1, "CLIP")]


def test_no_spec_left_starts_no_pool() -> None:
    # A resumed grid whose runs are all cached hands run_specs nothing: that is no error.
    assert run_specs([], processes=4) == []


class _Crash(RuntimeError):
    pass


def _figures(result: dict) -> tuple:
    final = result["final"]  # every figure but the clock's
    per_epoch = {
        e: {k: v for k, v in f.items() if k != "seconds"} for e, f in result["per_epoch"].items()
    }
    return (
        per_epoch,
        final["zero_shot"]["accuracy"],
        (final.get("targeted") or {}).get("success_rate"),
        result["defended_epochs"],
    )


def test_a_resumable_run_stopped_in_an_epoch_resumes_to_the_same_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grid run killed mid-run continues from its last epoch, figures and all, then tidies."""
    import roclip_kit.evaluate.run as evaluate

    build_captioned_dataset("digits", tmp_path / "d", seed=0, train_limit=64, test_limit=20)
    poisoned = poison_dataset(
        tmp_path / "p", dataset_dir=tmp_path / "d", targets=2, captions_per_target=2
    ).out_dir
    train = TensorTrainSettings(epochs=3, batch_size=32, preset=TINY)
    flags = {"pool_size": 32, "first_defended_epoch": 1, "defend_every": 1}

    def spec(name: str, resumable: bool) -> RunSpec:
        run_dir = tmp_path / "runs" / name
        return RunSpec(
            "R", poisoned, None, train, flags, run_dir, eval_limit=10, resumable=resumable
        )

    whole = run_spec(spec("whole", False))
    real, calls = evaluate.evaluate_model, []

    def crash_in_epoch_two(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise _Crash("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", crash_in_epoch_two)
    with pytest.raises(_Crash):
        run_spec(spec("stopped", True))
    run_dir = tmp_path / "runs" / "stopped"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_1.pt"]
    calls.clear()
    monkeypatch.setattr(
        evaluate, "evaluate_model", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    resumed = run_spec(spec("stopped", True))
    assert len(calls) == 3  # epochs 2 and 3, then the final evaluation: epoch 1 was not redone
    assert _figures(resumed) == _figures(whole)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "per_epoch.json").exists()
