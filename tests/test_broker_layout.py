"""The broker's layout holds: no import cycles inside ``broker``, a pure ``broker.core``, and the
three top-level parts import each other in one direction only (docs/internals.md).

Imports are read from the source (every ``import`` and ``from ... import``, also those inside
functions and under ``if TYPE_CHECKING:``), so a cycle hidden in a function body counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the scheduler core may not import: I/O, clocks, threads, the network, the store.
IMPURE = {
    "asyncio", "http", "httptools", "os", "paramiko", "pathlib", "shutil", "socket", "sqlite3",
    "subprocess", "threading", "time", "tornado", "urllib", "zmq",
}  # fmt: skip


def modules(package: str) -> dict[str, Path]:
    """Module name -> file, for every module of ``package`` (a top-level folder)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports (relative imports resolved against ``name``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
    return found


def graph(package: str) -> dict[str, set[str]]:
    """Import edges between the modules of ``package``."""
    mods = modules(package)
    return {name: imports_of(name, path) & set(mods) - {name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_broker_has_no_import_cycles() -> None:
    assert cycles(graph("broker")) == []


def test_broker_core_is_pure() -> None:
    """The scheduler core imports no I/O and no other part of the broker (docs/internals.md)."""
    problems = []
    for name, path in modules("broker").items():
        if not name.startswith("broker.core"):
            continue
        for imported in imports_of(name, path):
            top = imported.split(".")[0]
            if top in IMPURE:
                problems.append(f"{name} imports {imported}")
            if top == "broker" and not imported.startswith("broker.core"):
                problems.append(f"{name} imports {imported}")
            if top in ("gpu_kernel", "provisioner"):
                problems.append(f"{name} imports {imported}")
    assert problems == []


def test_parts_import_in_one_direction() -> None:
    """gpu_kernel imports neither broker nor provisioner; broker never imports provisioner."""
    problems = []
    rules = (("gpu_kernel", ("broker", "provisioner")), ("broker", ("provisioner",)))
    for package, forbidden in rules:
        for name, path in modules(package).items():
            for imported in imports_of(name, path):
                if imported.split(".")[0] in forbidden:
                    problems.append(f"{name} imports {imported}")
    assert problems == []
