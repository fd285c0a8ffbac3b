"""The import rules of docs/architecture.md, checked on the source of every module (AST, also imports
inside functions): `launch <- parallel <- pretrain -> data_pipelines`, so `launch` imports none of the
other three, `parallel` only `launch`, `data_pipelines` none of them; and no import cycle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("launch", "parallel", "pretrain", "data_pipelines")
ALLOWED = {  # package -> the project packages it may import
    "launch": set(),
    "parallel": {"launch"},
    "data_pipelines": set(),
    "pretrain": {"launch", "parallel", "data_pipelines"},
}


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its source (resolved to the most specific module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                add(full if full in known else mod)
    return out


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions_and_relative_imports():
    g = graph()
    assert "pretrain.train" in g["pretrain.cli"]  # imported inside cmd_train
    assert "data_pipelines.loader" in g["data_pipelines.bench"]  # `from .loader import ...`
    assert "pretrain.config.schema" in g["pretrain.config"]


def test_imports_run_one_way():
    bad = []
    for mod, deps in graph().items():
        pkg = mod.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != pkg and other not in ALLOWED[pkg]:
                bad.append(f"{mod} imports {dep} ({pkg} may import {sorted(ALLOWED[pkg]) or 'none of them'})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("g,expect", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder_finds_cycles(g, expect):
    assert cycles(g) == expect


def test_modules_stay_readable_size():
    """No module over ~400 lines, and at most about eight loose modules at the top of pretrain/."""
    long = {name: n for name, path in module_files().items()
            if (n := len(path.read_text().splitlines())) > 420}
    assert not long, f"modules over ~400 lines: {long}"
    loose = sorted(p.name for p in (ROOT / "pretrain").glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 8, f"pretrain/ has {len(loose)} loose modules: {loose}"
