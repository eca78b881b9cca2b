"""Runs as jobs: every run that finishes is reported, whatever happens to the others."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("open_clip")

from roclip_kit.attacks import poison_dataset  # noqa: E402
from roclip_kit.datasets import build_captioned_dataset  # noqa: E402
from roclip_kit.tensor_runs import RunsFailed, RunSpec, run_specs  # noqa: E402
from roclip_kit.tensor_train import TensorTrainSettings  # noqa: E402

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
