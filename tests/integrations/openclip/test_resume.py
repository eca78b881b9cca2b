"""``--resume``: a run stopped after epoch 2 and resumed ends as the uninterrupted run did (with
and without OpenCLIP's evaluation between epochs, from a local or an fsspec checkpoint); a crash
at any point leaves a checkpoint and RoCLIP state that belong together; a state from another
epoch, or one that cannot be restored, stops the run before training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train")
pytest.importorskip("sklearn.datasets")

from roclip_openclip import main  # noqa: E402
from roclip_openclip.patches import state_path_for  # noqa: E402

from roclip_plugin import get_plugin_manager  # noqa: E402

from .runs import (  # noqa: E402
    ROCLIP,
    _argv,
    _assert_same_run,
    _ckpt,
    _stop_after_epoch_two,
    _validated,
)


def test_resume_after_epoch_two_is_exact(setup, straight) -> None:
    _stop_after_epoch_two(_argv(setup, "stopped", 3, *ROCLIP))
    assert not _ckpt(setup, "stopped", 3).exists()
    resume = ["--resume", str(_ckpt(setup, "stopped", 2))]
    assert main(_argv(setup, "stopped-resumed", 3, *ROCLIP, *resume)) == 0
    _assert_same_run(setup, "straight", "stopped-resumed")


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
