"""The intra-package import graph of streamlev, read from the source with ``ast`` (nothing is imported).

Used by ``tests/test_layers.py``; also a measurement script::

    python -m tests._import_graph [path/to/streamlev]

prints the number of import cycles, upward imports (against the layer map in
``tests/test_layers.py``), intra-package imports inside functions, and the
largest modules.
"""

from __future__ import annotations

import ast
import pathlib
import sys
from typing import NamedTuple

PACKAGE = "streamlev"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE


class Edge(NamedTuple):
    src: str  # importing module
    dst: str  # imported streamlev module
    line: int
    in_function: bool


def module_names(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every .py file of the package (``streamlev`` for ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict) -> bool:
    return files.get(name, pathlib.Path()).name == "__init__.py"


def edges(root: pathlib.Path = ROOT) -> list[Edge]:
    """Every import of a streamlev module by a streamlev module, with where it happens."""
    files = module_names(root)
    out = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        base = mod if _is_package(mod, files) else mod.rpartition(".")[0]
        for node, in_fn in _walk(tree, False):
            for target in _targets(node, base, files):
                if target != mod:
                    out.append(Edge(mod, target, node.lineno, in_fn))
    return out


def _walk(node, in_fn):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_fn
        inner = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, inner)


def _targets(node, base: str, files: dict):
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                yield _existing(alias.name, files)
        return
    if node.level:
        pkg = base.split(".")
        pkg = pkg[: len(pkg) - (node.level - 1)]
        origin = ".".join(pkg + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    if origin.split(".")[0] != PACKAGE:
        return
    for alias in node.names:
        sub = f"{origin}.{alias.name}"
        yield sub if sub in files else _existing(origin, files)


def _existing(name: str, files: dict) -> str:
    while name not in files and "." in name:
        name = name.rpartition(".")[0]
    return name


def cycles(es: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set] = {}
    for e in es:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(max(1000, 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str, layers: dict) -> int | None:
    """Index of the layer holding ``module`` (entries ending in ``.*`` cover a subpackage), or None."""
    for i, names in enumerate(layers.values()):
        for pattern in names:
            if module == pattern or (pattern.endswith(".*") and (module == pattern[:-2]
                                                                  or module.startswith(pattern[:-1]))):
                return i
    return None


def upward(es: list[Edge], layers: dict) -> list[Edge]:
    """Imports of a module in a higher layer (unmapped modules are reported elsewhere)."""
    bad = []
    for e in es:
        a, b = layer_of(e.src, layers), layer_of(e.dst, layers)
        if a is not None and b is not None and b > a:
            bad.append(e)
    return bad


def main(argv=None):
    from .test_layers import LAYERS

    root = pathlib.Path((argv or sys.argv[1:] or [ROOT])[0]).resolve()
    es = edges(root)
    files = module_names(root)
    cyc = cycles(es)
    up = upward(es, LAYERS)
    lazy = [e for e in es if e.in_function]
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in files.items()), reverse=True)
    print(f"modules: {len(files)}, intra-package imports: {len(es)}")
    print(f"cycles: {len(cyc)}  {cyc}")
    print(f"upward imports: {len(up)}  " + ", ".join(f"{e.src}->{e.dst}" for e in up))
    print(f"intra-package imports inside functions: {len(lazy)}")
    print("unmapped modules:", [m for m in files if layer_of(m, LAYERS) is None])
    print("largest modules:", ", ".join(f"{m} {n}" for n, m in sizes[:5]))
    print(f"modules over 500 lines: {sum(n > 500 for n, _ in sizes)}")


if __name__ == "__main__":
    main()
