from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from roclip_plugin.io import atomic_torch_save, atomic_write_text, load_versioned


def test_round_trip_and_format_check(tmp_path: Path) -> None:
    path = atomic_torch_save({"format": 3, "x": torch.arange(4)}, tmp_path / "a" / "s.pt")
    assert torch.equal(load_versioned(path, 3, "test state")["x"], torch.arange(4))
    with pytest.raises(ValueError, match=r"s.pt: not a test state \(format 3, expected 4\)"):
        load_versioned(path, 4, "test state")
    atomic_torch_save([1, 2], path)
    with pytest.raises(ValueError, match="format None"):
        load_versioned(path, 3, "test state")


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = atomic_torch_save({"format": 1}, tmp_path / "s.pt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError, match="full"):
        atomic_torch_save({"format": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]


def test_state_file_errors_name_the_file(tmp_path: Path) -> None:
    from roclip_plugin.io import StateError

    with pytest.raises(ValueError, match=r"test state .* is a directory; give a file"):
        load_versioned(tmp_path, 1, "test state")
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(StateError, match=r"e\.pt is empty"):
        load_versioned(tmp_path / "e.pt", 1, "test state")
    (tmp_path / "g.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(StateError, match=r"g\.pt cannot be read"):
        load_versioned(tmp_path / "g.pt", 1, "test state")


def test_output_checks_refuse_before_any_work(tmp_path: Path) -> None:
    from roclip_plugin.io import atomic_write_text, check_output_dir, check_output_file

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--json .* is a directory"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(ValueError, match=r"--json .*: .*f is a file, not a directory"):
        check_output_file(tmp_path / "f" / "out.json", "--json")
    with pytest.raises(ValueError, match="--out .* is a file, not a directory"):
        check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(ValueError, match="--out: an empty path"):
        check_output_dir("", "--out")
    assert check_output_file(None, "--json") is None
    path = atomic_write_text(tmp_path / "new" / "r.json", "{}")
    assert path.read_text() == "{}" and [p.name for p in path.parent.iterdir()] == ["r.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask_like_any_other_output(tmp_path: Path, umask: int) -> None:
    """mkstemp makes 0600 files; a .roclip state or a --json report must be 0644 under the
    usual umask 022, as open() would make it, so other users and tools can read it."""
    old = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "report.json", "{}")
        state = atomic_torch_save({"x": 1}, tmp_path / "epoch_1.roclip")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE(plain.stat().st_mode) == want  # what open() does
    assert stat.S_IMODE(text.stat().st_mode) == want
    assert stat.S_IMODE(state.stat().st_mode) == want


def test_atomic_write_bytes_replaces_whole_and_keeps_the_old_file_on_failure(
    tmp_path: Path, monkeypatch
) -> None:
    from roclip_plugin import io as rio

    path = rio.atomic_write_bytes(tmp_path / "sub" / "chunk.npy", b"\x00\x01old")
    assert path.read_bytes() == b"\x00\x01old"
    rio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        rio.atomic_write_bytes(path, b"torn")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["chunk.npy"]
