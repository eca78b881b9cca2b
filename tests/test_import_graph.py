"""The import arrows of the tree, read from its own source: which package may import which,
and no circle.

The rules (docs/architecture.md): the core (``roclip_plugin``) imports no integration and no
OpenCLIP; the adapters ``roclip_openclip`` and ``roclip_torch`` import the core only, never
each other nor the kit; the kit (``roclip_kit``) imports the adapters only through what they
declare for it (:data:`KIT_MAY_IMPORT`); no circle anywhere. The kit's own rooms and the
circles between its files are held by its own test (tests/integrations/kit).

An import circle lets a change to one module (the augmentation registry, say) reach the plugin
manager and come back, and makes import order matter. The graph is built from every ``import``
the modules write (at module level or inside functions: a lazy import still closes a circle
when it runs), leaving out type-only imports under ``if TYPE_CHECKING:``. Importing a module of
a sub-package from outside it runs that sub-package's ``__init__`` first, so such an import is
also an edge to every enclosing package the importer is not part of.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import roclip_kit
import roclip_openclip
import roclip_torch

import roclip_plugin

CORE = Path(roclip_plugin.__file__).parent
ROOT_NAME = "roclip_plugin"
PACKAGES = {
    ROOT_NAME: CORE,
    "roclip_openclip": Path(roclip_openclip.__file__).parent,
    "roclip_torch": Path(roclip_torch.__file__).parent,
    "roclip_kit": Path(roclip_kit.__file__).parent,
}
ADAPTERS = ("roclip_openclip", "roclip_torch")
# What the kit may import of the adapters: their package faces (the kit runs
# ``python -m roclip_openclip`` and drives ``roclip_torch.RoClipAdapter``), and the Trainer's
# checkpoint files (names in ``roclip_torch.checkpoint``, their format in ``roclip_torch.loop``)
# that the kit's tensor path writes and ``roclip scan`` reads.
KIT_MAY_IMPORT = {"roclip_openclip", "roclip_torch", "roclip_torch.checkpoint", "roclip_torch.loop"}


def module_name(path: Path, package: str = ROOT_NAME) -> str:
    """``roclip_plugin/augment/keys.py`` -> ``roclip_plugin.augment.keys`` (``__init__``: the
    package)."""
    parts = [package, *path.relative_to(PACKAGES[package]).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return package_modules(ROOT_NAME)


def package_modules(package: str) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(PACKAGES[package].rglob("*.py"))}


def tree_modules() -> dict[str, Path]:
    return {name: path for package in PACKAGES for name, path in package_modules(package).items()}


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
    """The known modules one import statement names."""
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


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the modules it imports at run time (of ``modules``: the core by default)."""
    modules = core_modules() if modules is None else modules
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
    allowed = {
        "roclip_plugin",
        "roclip_plugin.pool",
        "roclip_plugin.distributed",
        "roclip_plugin.contrastive",  # the unimodal terms' math, which the loss shares
    }
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


def _package(module: str) -> str:
    return module.split(".")[0]


def _reached(graph: dict[str, set[str]], package: str) -> set[str]:
    """Every module of another package that ``package``'s modules import."""
    return {
        target
        for name, targets in graph.items()
        if _package(name) == package
        for target in targets
        if _package(target) != package
    }


def test_the_core_imports_no_integration_and_no_openclip() -> None:
    graph = import_graph(tree_modules())
    assert _reached(graph, ROOT_NAME) == set()
    reached = set().union(*(_top_level_imports(path) for path in core_modules().values()))
    assert not reached & {"open_clip", "open_clip_train", *PACKAGES.keys() - {ROOT_NAME}}


def test_the_adapters_import_the_core_only() -> None:
    """Neither adapter imports the other or the kit: each works installed alone."""
    graph = import_graph(tree_modules())
    for adapter in ADAPTERS:
        reached = {_package(target) for target in _reached(graph, adapter)}
        assert reached == {ROOT_NAME}, (adapter, reached)


def test_the_kit_imports_the_adapters_only_through_what_they_declare() -> None:
    graph = import_graph(tree_modules())
    reached = {t for t in _reached(graph, "roclip_kit") if _package(t) in ADAPTERS}
    assert reached <= KIT_MAY_IMPORT, reached - KIT_MAY_IMPORT
    assert {"roclip_openclip", "roclip_torch"} <= reached  # the rule sees the kit's imports


def test_the_tree_has_no_import_circle() -> None:
    """No circle within or between the core and the adapters, nor through the kit (circles
    between the kit's own files: its own test, tests/integrations/kit)."""
    graph = import_graph(tree_modules())
    for name, targets in graph.items():
        if _package(name) == "roclip_kit":
            graph[name] = {t for t in targets if _package(t) != "roclip_kit"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_adapters_former_circles_are_gone() -> None:
    """The command line and the OpenCLIP patches share ``usage``; the Trainer and its report
    share ``summary``; neither pair imports each other."""
    graph = import_graph(tree_modules())
    assert "roclip_openclip.cli" not in graph["roclip_openclip.patches"]
    assert "roclip_openclip.usage" in graph["roclip_openclip.patches"]
    assert "roclip_torch.loop" not in graph["roclip_torch.report"]
    assert "roclip_torch.summary" in graph["roclip_torch.report"]


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_loss_imports_nothing_of_the_defense() -> None:
    """One way through a step: the defense plans, the loss computes from the plan's tensors.

    The loss modules reach none of the rooms that decide (defense, step, risk, pool, matching,
    schedule) nor the hooks, at any depth: nothing in them can call back into the defense."""
    graph = import_graph()
    deciding = {
        "roclip_plugin.defense",
        "roclip_plugin.step",
        "roclip_plugin.risk",
        "roclip_plugin.pool",
        "roclip_plugin.matching",
        "roclip_plugin.schedule",
        "roclip_plugin.hookspecs",
        "roclip_plugin.plugins",
        "roclip_plugin.builtins",
    }
    for module in ("roclip_plugin.loss", "roclip_plugin.siglip", "roclip_plugin.contrastive"):
        reached = _reach(graph, module)
        bad = {t for t in reached if any(t == d or t.startswith(d + ".") for d in deciding)}
        assert not bad, (module, bad)
    assert "roclip_plugin.loss" in graph["roclip_plugin.step"]  # the arrow points this way
    assert "roclip_plugin.step" in graph["roclip_plugin.defense"]
