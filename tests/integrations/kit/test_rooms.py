"""The kit's rooms import downwards only: each room what its ``__init__`` allows, no circle.

Read from the source like tests/test_import_graph.py reads the core: every ``import`` a kit
module writes, at module level or inside a function (a lazy import still runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import roclip_kit

KIT = Path(roclip_kit.__file__).parent
# room -> the other rooms and packages it may import (docs/architecture.md)
ALLOWED = {
    "files": {"roclip_plugin"},
    "outputs": {"roclip_plugin"},
    "data": {"roclip_plugin", "files", "outputs"},
    "attack": {"roclip_plugin", "files", "outputs"},
    "train": {"roclip_plugin", "roclip_torch", "roclip_openclip", "files", "data"},
    "evaluate": {"roclip_plugin", "files", "data", "attack", "train"},
    "demo": {"roclip_plugin", "roclip_torch", "files", "outputs", "data", "attack", "train",
             "evaluate"},
    "commands": {"roclip_plugin", "files", "outputs", "data", "attack", "train", "evaluate",
                 "demo"},
    "plugin": {"roclip_plugin", "commands"},
}  # fmt: skip


def _module(path: Path) -> str:
    parts = ["roclip_kit", *path.relative_to(KIT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    """``roclip_kit.train.tensor`` -> ``train``; another package -> its top-level name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "roclip_kit" and len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("roclip")}


def test_every_room_imports_only_what_it_may() -> None:
    wrong = []
    for path in sorted(KIT.rglob("*.py")):
        room = _room(_module(path))
        if room == "roclip_kit":  # the package's own __init__
            continue
        for target in _imports(path):
            other = _room(target)
            if other != room and other not in ALLOWED[room]:
                wrong.append(f"{_module(path)} imports {target}")
    assert not wrong, wrong


def test_the_kit_has_no_import_circle() -> None:
    graph = {_module(p): _imports(p) for p in sorted(KIT.rglob("*.py"))}
    known = set(graph)
    edges = {m: {t for t in targets if t in known and t != m} for m, targets in graph.items()}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError(" -> ".join([*trail[trail.index(node) :], node]))
        if node in done:
            return
        for target in sorted(edges[node]):
            visit(target, [*trail, node])
        done.add(node)

    for module in sorted(edges):
        visit(module, [])
