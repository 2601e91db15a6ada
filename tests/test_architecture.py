"""The house rules of ARCHITECTURE.md, checked on the source: no import circles between our modules (lazy imports
inside functions count too: they hide a circle, they do not break it), routers stay independent of each other, and
the serving path never imports torch."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model_training", "uplink_server", "web_app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _statements(path: Path) -> list[list]:
    """[at module level, module (None for ``import a, b``), level, names] of every import statement in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    return [[id(n) in top, None if isinstance(n, ast.Import) else (n.module or ""),
             getattr(n, "level", 0), [a.name for a in n.names]]
            for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


@functools.cache
def _all_statements() -> dict[str, list]:
    """Every module's import statements, parsed in a fresh interpreter: CPython 3.11.7's ast.parse can fail with
    "AST constructor recursion depth mismatch" in a process that earlier tests left in some states (fixed in 3.11.8)."""
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def _imports(name: str, known: set[str], top_only: bool = False) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file (module level or inside functions), or with
    ``top_only`` at module level only (what importing it loads)."""
    is_pkg = _modules()[name].name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for at_top, module, level, names in _all_statements()[name]:
        if top_only and not at_top:
            continue
        if module is None:
            targets = names
        else:
            if level:
                base = package.split(".")
                base = base[: len(base) - (level - 1)]
                module = ".".join(base + ([module] if module else []))
            # "from pkg import module" names a module; "from module import name" names the module itself
            targets = [f"{module}.{a}" if f"{module}.{a}" in known else module for a in names]
        for t in targets:
            while t and t not in known:  # a.b.c where a.b is the module
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a module's own package is not an edge
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, known) for n in mods}


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
            todo.extend(_imports(m, set(mods), top_only=True))
    for m in reach:
        for at_top, module, _, names in _all_statements()[m]:  # module level: what an import of it loads
            loaded = names if module is None else [module]
            assert not (at_top and any(n == "torch" or n.startswith("torch.") for n in loaded)), \
                f"{m} imports torch at module level"


if __name__ == "__main__":  # the child interpreter of _all_statements
    print(json.dumps({n: _statements(p) for n, p in _modules().items()}))
