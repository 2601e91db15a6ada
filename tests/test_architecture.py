"""The house rules of ARCHITECTURE.md, checked on the source: no import circles between our modules (lazy imports
inside functions count too: they hide a circle, they do not break it), routers stay independent of each other, and
the serving path never imports torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model_training", "uplink_server", "web_app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str], top_only: bool = False) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file (module level or inside functions), or with
    ``top_only`` at module level only (what importing it loads)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import module" names a module; "from module import name" names the module itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a.b.c where a.b is the module
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a module's own package is not an edge
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = _graph()
    assert len(graph) > 80  # the walk found the project
    assert "uplink_server.imaging" in graph["uplink_server.model"]
    assert _cycles(graph) == []


def test_routers_do_not_import_each_other():
    graph = _graph()
    routers = {m for m in graph if m.startswith("web_app.routes.")}
    assert {"web_app.routes.api", "web_app.routes.cases", "web_app.routes.admin"} <= routers
    for r in routers:
        assert not graph[r] & routers, f"{r} imports another router: move what they share to web_app.queries or below"


@pytest.mark.parametrize("package", ["uplink_server", "web_app"])
def test_the_serving_path_imports_no_torch(package):
    """Serving needs ONNX Runtime, numpy and pillow only; torch is for training (model_training imports it lazily,
    and the web app only uses model_training's torch-free modules)."""
    graph, mods = _graph(), _modules()
    reach, todo = set(), [m for m in graph if m.split(".")[0] == package]
    while todo:
        m = todo.pop()
        if m in reach:
            continue
        reach.add(m)
        if m.startswith(package + "."):
            todo.extend(graph[m])
        elif m.startswith("model_training"):
            todo.extend(_imports(m, mods[m], set(mods), top_only=True))
    for m in reach:
        tree = ast.parse(mods[m].read_text())
        for node in tree.body:  # module level: what an import of it loads
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{m} imports torch at module level"
