from __future__ import annotations

from pathlib import Path

import pytest
import torch

from roclip_plugin.io import atomic_torch_save, load_versioned


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
