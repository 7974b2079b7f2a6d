"""The package's layers: nothing imports a module above its own layer, and no modules
import each other (directly or around a longer cycle).

Bottom to top: errors, registry and memory, geometry, fourier, processors, align, io,
config and parallel, stages, refine (and testing), cli. Every import counts: module-level and
function-local ``import``/``from ... import`` statements, relative imports, and
strings that name a package module (as ``importlib.import_module`` would take them).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import cryorefine

PACKAGE = Path(cryorefine.__file__).parent

LAYERS = {
    "cryorefine": 0,
    "cryorefine.errors": 0,
    "cryorefine.registry": 0,
    "cryorefine.memory": 0,
    "cryorefine.geometry": 1,
    "cryorefine.fourier": 2,
    "cryorefine.processors": 3,
    "cryorefine.align": 4,
    "cryorefine.io": 5,
    "cryorefine.config": 6,
    "cryorefine.parallel": 6,
    "cryorefine.stages": 7,
    "cryorefine.refine": 8,
    "cryorefine.testing": 8,
    "cryorefine.cli": 9,
    "cryorefine.__main__": 9,
}


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("cryorefine",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_names()


def layer(module: str) -> int:
    """The layer of the longest prefix of ``module`` in :data:`LAYERS`."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        name = ".".join(parts[:k])
        if name in LAYERS:
            return LAYERS[name]
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def imports_of(module: str, path: Path) -> set[str]:
    """Every package module that ``module`` imports, wherever the import stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        # a name may be a module or an object inside one: keep the longest module prefix
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            candidate = ".".join(parts[:k])
            if candidate in MODULES:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            add(source)
            for alias in node.names:  # `from pkg import submodule`
                add(f"{source}.{alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"cryorefine(\.\w+)+", node.value):
                add(node.value)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_one_above_its_layer(module):
    upward = sorted(dep for dep in GRAPH[module] if layer(dep) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports {upward}"


def test_no_import_cycles():
    """Tarjan's strongly connected components: every component is a single module.
    (A package's ``__init__`` importing its own submodules is not a cycle unless a
    submodule imports the package back.)"""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_checker_sees_function_local_and_string_imports(tmp_path):
    """The walker would catch what it is meant to catch."""
    src = tmp_path / "fake.py"
    src.write_text(
        "def f():\n"
        "    from cryorefine.stages.make3d import make3d\n"
        "    import importlib\n"
        "    importlib.import_module('cryorefine.cli.demo')\n"
    )
    found = imports_of("cryorefine.geometry.fake", src)
    assert {"cryorefine.stages.make3d", "cryorefine.cli.demo"} <= found
    assert all(layer(d) > layer("cryorefine.geometry.fake") for d in found)


def test_importing_the_package_changes_no_thread_setting(monkeypatch):
    """Importing cryorefine leaves the host program's OpenMP settings alone."""
    import importlib
    import os

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    importlib.reload(cryorefine)
    assert "GOMP_SPINCOUNT" not in os.environ
