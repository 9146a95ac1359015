"""The layering of docs/architecture.md, read from the code's imports with ``ast``.

Imports point down only: a module may import from its own package and from lower layers,
never from a higher one or a sibling package of its layer. Every import counts, those
inside functions and under ``TYPE_CHECKING`` too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "cachefs"

#: Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("cachefs.errors", "cachefs.paths", "cachefs.defaults", "cachefs.progress",
     "cachefs.address", "cachefs.mounts", "cachefs.owners"),
    ("cachefs.remote", "cachefs.store"),
    ("cachefs.link",),
    ("cachefs.cache",),
    ("cachefs.sync",),
    ("cachefs.control",),
    ("cachefs.fs",),
    ("cachefs.daemon", "cachefs.redact", "cachefs.recover", "cachefs.caches", "cachefs.cli", "cachefs.registry",
     "cachefs"),
]
#: layers whose modules may import each other (plain helpers at the bottom; the entry
#: points at the top, where the command line starts the daemon)
OPEN_LAYERS = {0, len(LAYERS) - 1}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> tuple[int, str]:
    """(layer, unit): the unit is the listed prefix (a package or a top-level module)."""
    best: tuple[int, str] | None = None
    for layer, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                    best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    assert best is not None, f"{module} is in no layer of tests/test_layers.py: place it"
    return best


def _imports(path: Path) -> set[str]:
    """Every cachefs module and third-party top-level package ``path`` imports."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from . import x" names a module when x is one (then the package's
            # __init__ is not what is used)
            modules = [target + "." + alias.name for alias in node.names
                       if (ROOT.parent / (target + "." + alias.name).replace(".", "/")).with_suffix(".py").exists()]
            found.update(modules or [target])
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


GRAPH = _graph()


def _pointing_up(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` that point up or sideways."""
    wrong = []
    for module, targets in graph.items():
        layer, unit = _unit(module)
        for target in targets:
            if not target.startswith("cachefs"):
                continue
            target_layer, target_unit = _unit(target)
            if target_unit == unit or target_layer < layer:
                continue
            if target_layer == layer and layer in OPEN_LAYERS:
                continue
            wrong.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
    return sorted(wrong)


def test_every_import_points_down() -> None:
    wrong = _pointing_up(GRAPH)
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_package_level_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        unit = _unit(module)[1]
        for target in targets:
            if target.startswith("cachefs") and _unit(target)[1] != unit:
                edges.setdefault(unit, set()).add(_unit(target)[1])
    seen: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(unit: str, path: list[str]) -> None:
        seen[unit] = 1
        for nxt in sorted(edges.get(unit, ())):
            assert seen.get(nxt) != 1, "package cycle: " + " -> ".join(path + [unit, nxt])
            if nxt not in seen:
                visit(nxt, path + [unit])
        seen[unit] = 2

    for unit in sorted(edges):
        if unit not in seen:
            visit(unit, [])


@pytest.mark.parametrize("module, forbidden", [
    ("cachefs.fs", ("lmdb", "cachefs.sync", "cachefs.store", "cachefs.remote", "cachefs.link")),
    ("cachefs.remote", ("cachefs.cache", "cachefs.sync", "cachefs.store", "cachefs.link", "lmdb", "trio")),
    ("cachefs.store", ("cachefs.cache", "cachefs.sync", "cachefs.link", "cachefs.remote", "trio", "pyfuse3", "paramiko")),
    ("cachefs.cache", ("pyfuse3", "cachefs.sync")),
    ("cachefs.control", ("lmdb", "cachefs.store", "cachefs.link", "cachefs.remote")),
])
def test_layer_keeps_out_of(module: str, forbidden: tuple[str, ...]) -> None:
    wrong = sorted(f"{m} imports {t}" for m, targets in GRAPH.items()
                   if m == module or m.startswith(module + ".")
                   for t in targets for f in forbidden if t == f or t.startswith(f + "."))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", ["cachefs.fs", "cachefs.control"])
def test_reaches_only_the_cache_facade(module: str) -> None:
    """fs and control ask the ``Cache`` façade, the sync manager and the hoard by their
    named methods: no reaching through them into the store, the link, the kernel or the
    hoard (``cache.store.x``, ``sync.hoard.y``)."""
    path = ROOT / (module.split(".", 1)[1] + ".py")
    wrong = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr in ("cache", "sync") and node.attr in (
                    "store", "conn", "kernel", "remote", "hoard", "_store", "_conn", "_kernel"):
            wrong.append(f"line {node.lineno}: .{node.value.attr}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_back_edge() -> None:
    """The reader finds relative, lazy and ``from . import`` imports, and the rule flags an
    upward and a sideways edge (or the tests above would pass on nothing)."""
    assert any(t.startswith("cachefs.store") for t in GRAPH["cachefs.sync.manager"])
    assert "cachefs.store.crypto" in GRAPH["cachefs.cli"]  # imported inside a function
    assert _unit("cachefs.cache.cache") == (3, "cachefs.cache")
    assert "cachefs" not in GRAPH["cachefs.fs"]  # "from . import control" is control
    assert _pointing_up({"cachefs.store.index": {"cachefs.sync.manager"},
                         "cachefs.remote.sftp": {"cachefs.store.index"},
                         "cachefs.sync.manager": {"cachefs.store.index"}}) == [
        "cachefs.remote.sftp (layer 1) imports cachefs.store.index (layer 1)",
        "cachefs.store.index (layer 1) imports cachefs.sync.manager (layer 4)"]
