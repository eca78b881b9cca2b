"""The core's import graph, read from its own source, has no cycle.

An import circle lets a change to one module (the augmentation registry, say) reach the plugin
manager and come back, and makes import order matter. The graph is built from every ``import``
the core's modules write (at module level or inside functions: a lazy import still closes a
circle when it runs), leaving out type-only imports under ``if TYPE_CHECKING:``. Importing a
module of a sub-package from outside it runs that sub-package's ``__init__`` first, so such an
import is also an edge to every enclosing package the importer is not part of.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import roclip_plugin

CORE = Path(roclip_plugin.__file__).parent
ROOT_NAME = "roclip_plugin"


def module_name(path: Path) -> str:
    """``roclip_plugin/augment/keys.py`` -> ``roclip_plugin.augment.keys`` (``__init__``: the
    package)."""
    parts = [ROOT_NAME, *path.relative_to(CORE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import below ``node`` except the body of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _imports(child)


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _targets(
    node: ast.Import | ast.ImportFrom, importer: str, path: Path, known: set[str]
) -> set[str]:
    """The core modules one import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    if node.level:
        package = _package_of(importer, path).split(".")
        anchor = ".".join(package[: len(package) - node.level + 1])
        base = f"{anchor}.{base}" if base else anchor
    found = {f"{base}.{alias.name}" for alias in node.names} & known
    if len(found) < len(node.names) and base in known:  # names defined in the module itself
        found.add(base)
    return found


def _enclosing_packages(target: str, importer: str, known: set[str]) -> set[str]:
    """Packages whose ``__init__`` runs first because ``importer`` lies outside them."""
    parts = target.split(".")
    parents = {".".join(parts[:i]) for i in range(1, len(parts))}
    return {p for p in parents & known if importer != p and not importer.startswith(p + ".")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the core modules it imports at run time."""
    modules = core_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, name, path, known):
                edges |= {target} | _enclosing_packages(target, name, known)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_core_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in the core: " + " -> ".join(cycle or [])


def test_the_graph_sees_real_imports_and_skips_type_only_ones() -> None:
    graph = import_graph()
    assert {"roclip_plugin.builtins", "roclip_plugin.hookspecs"} <= graph["roclip_plugin.plugins"]
    assert "roclip_plugin.augment" in graph["roclip_plugin.builtins"]
    assert "roclip_plugin.augment.keys" in graph["roclip_plugin.augment.policy"]
    assert "roclip_plugin.smoke" in graph["roclip_plugin.cli"]  # a lazy import inside a function
    # hookspecs names the defense's types under TYPE_CHECKING only
    assert "roclip_plugin.defense" not in graph["roclip_plugin.hookspecs"]


def test_the_augmentation_package_never_imports_the_plugin_manager() -> None:
    graph = import_graph()
    augment = {name for name in graph if name.startswith("roclip_plugin.augment")}
    assert len(augment) >= 7
    reached = {target for name in augment for target in graph[name]}
    assert not reached & {"roclip_plugin.plugins", "roclip_plugin.builtins"}


def test_find_cycle_finds_a_cycle_and_an_enclosing_package_edge() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    known = {"roclip_plugin", "roclip_plugin.augment", "roclip_plugin.augment.keys"}
    outside = _enclosing_packages("roclip_plugin.augment.keys", "roclip_plugin.pool", known)
    inside = _enclosing_packages(
        "roclip_plugin.augment.keys", "roclip_plugin.augment.policy", known
    )
    assert outside == {"roclip_plugin.augment"} and inside == set()


def test_the_risk_room_imports_only_the_pool_from_the_core() -> None:
    """The risk room is handed its config and plugin manager; it reaches the pool and the
    distribution helpers, nothing else of the core."""
    graph = import_graph()
    risk = {name for name in graph if name.startswith("roclip_plugin.risk")}
    assert len(risk) >= 6
    reached = {t for name in risk for t in graph[name] if not t.startswith("roclip_plugin.risk")}
    allowed = {"roclip_plugin", "roclip_plugin.pool", "roclip_plugin.distributed"}
    assert reached <= allowed, reached


def _top_level_imports(path: Path) -> set[str]:
    """The top-level package of every module ``path`` imports (type-only imports left out)."""
    names: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_scan_room_imports_no_integration_and_no_open_clip() -> None:
    """``roclip_plugin.scan`` scores embeddings it is given: embedding with a model is the
    kit's part, so the core's scan runs (and is tested) without OpenCLIP or the adapters."""
    files = sorted((CORE / "scan").rglob("*.py"))
    assert len(files) >= 5
    reached = set().union(*(_top_level_imports(path) for path in files))
    forbidden = {"open_clip", "roclip_kit", "roclip_openclip", "roclip_torch"}
    assert not reached & forbidden, reached & forbidden
    assert {"faiss", "numpy", "roclip_plugin"} <= reached  # the rule sees real imports
