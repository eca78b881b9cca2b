"""The adapter's contract with OpenCLIP: which releases it supports, and every name it uses.

Supported: open_clip_torch 2.26 up to, not including, 4.0 (the 2.x and 3.x training scripts,
whose ``open_clip_train.main`` still has ``create_loss``). The suite runs against the installed
3.x release. OpenCLIP 4.x moved training into a ``TrainingTask`` and dropped ``create_loss``;
docs/openclip.md says what the adapter would need for it.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest
import roclip_openclip
from roclip_openclip import cli, openclip_api
from roclip_openclip.openclip_api import OpenClipName, is_supported, parse_version
from roclip_openclip.usage import UsageError

ADAPTER = Path(roclip_openclip.__file__).parent


def test_the_supported_releases_are_2_26_up_to_4() -> None:
    assert openclip_api.SUPPORTED == ((2, 26), (4, 0))
    assert is_supported((2, 26)) and is_supported((3, 3)) and is_supported((3, 99))
    assert not is_supported((2, 25)) and not is_supported((4, 0)) and not is_supported((1, 30))


def test_the_installed_openclip_is_supported_and_has_every_name() -> None:
    pytest.importorskip("open_clip_train")
    version = openclip_api.installed_version()
    assert version is not None and is_supported(version), version
    assert openclip_api.missing_names() == []
    assert len(openclip_api.NAMES) == len({str(name) for name in openclip_api.NAMES})


def test_a_name_the_installed_openclip_lacks_is_reported(monkeypatch) -> None:
    gone = OpenClipName("open_clip_train.main", "create_loss_of_another_release", "test")
    monkeypatch.setattr(openclip_api, "NAMES", (gone, openclip_api.MAIN))
    pytest.importorskip("open_clip_train")
    assert openclip_api.missing_names() == [str(gone)]


def test_parse_version_reads_major_and_minor() -> None:
    assert parse_version("3.3.0") == (3, 3)
    assert parse_version("2.26.1.dev0") == (2, 26)
    assert parse_version("4.0.0") == (4, 0)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (
            (4, 0),
            "open_clip_torch 4.0 is not supported by roclip-openclip-train "
            "(supported: 2.26 to <4.0)",
        ),
        ((2, 24), "open_clip_torch 2.24 is not supported"),
        (None, "open_clip_torch is not installed: pip install 'roclip-plugin[openclip]'"),
    ],
)
def test_the_command_refuses_an_unsupported_release(monkeypatch, version, message) -> None:
    monkeypatch.setattr(openclip_api, "installed_version", lambda: version)
    with pytest.raises(UsageError) as err:
        cli.check_version()
    assert message in str(err.value)


def test_replaced_sets_a_module_or_class_attribute_for_the_block_only(monkeypatch) -> None:
    module = types.ModuleType("fake_open_clip")
    module.run = "original"  # type: ignore[attr-defined]
    module.Dataset = type("Dataset", (), {"item": "original"})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_open_clip", module)
    for name in (
        OpenClipName("fake_open_clip", "run", ""),
        OpenClipName("fake_open_clip", "Dataset.item", ""),
    ):
        with name.replaced("patched"):
            assert name.get() == "patched"
        assert name.get() == "original"
    with pytest.raises(RuntimeError), OpenClipName("fake_open_clip", "run", "").replaced(1):
        raise RuntimeError("the block failed")
    assert module.run == "original"


def _openclip_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {n for n in names if n.split(".")[0] in ("open_clip", "open_clip_train")}
    return found


def test_no_module_of_the_adapter_imports_openclip_but_through_openclip_api() -> None:
    """Every OpenCLIP name the adapter uses is resolved by ``openclip_api``, so the list there is
    the whole contract: a module importing OpenCLIP directly would hold a name it lacks."""
    files = sorted(ADAPTER.glob("*.py"))
    assert len(files) >= 7
    direct = {path.name: _openclip_imports(path) for path in files}
    assert {name: found for name, found in direct.items() if found} == {}
    modules = {name.module for name in openclip_api.NAMES}
    assert modules == {
        "open_clip",
        "open_clip_train.main",
        "open_clip_train.data",
        "open_clip_train.params",
    }
