"""The layer rule of streamlev, written once and enforced on the source (an AST walk, nothing imported).

LAYERS below is THE layer map: every module of ``streamlev/`` must be listed in
exactly one layer (an entry ending in ``.*`` covers a whole subpackage). A module
may import modules of its own layer or of layers listed before it, never after;
there are no import cycles; intra-package imports sit at module level (lazy
imports inside functions are only for optional third-party packages). See
docs/architecture.md.
"""

from __future__ import annotations

import pytest

from ._import_graph import cycles, edges, layer_of, module_names, upward

# Lowest layer first. Register a new module here (the test below fails until you do).
LAYERS = {
    # numpy / scipy / numba only: constants, validation, byte format, LAPACK factor, kernels,
    # scaled factor, retained-row storage, id bookkeeping, io
    "core": ["streamlev._constants", "streamlev._validation", "streamlev._format", "streamlev._factor",
             "streamlev._kernels.*", "streamlev._scaled_factor", "streamlev._retained", "streamlev._ids",
             "streamlev._scaling", "streamlev._topk", "streamlev._state_format", "streamlev.io",
             "streamlev._engine_store", "streamlev._engine_checks", "streamlev._parallel"],
    # offline math on a whole key matrix
    "offline": ["streamlev.leverage", "streamlev.lewis", "streamlev.sensitivity"],
    # stateful, mergeable sketches and their shared base
    "sketches": ["streamlev._sketch_base", "streamlev._decode", "streamlev.sketch", "streamlev.lp",
                 "streamlev.embedding", "streamlev.multihead", "streamlev.query_sketch", "streamlev._heavy",
                 "streamlev._shift_invariant", "streamlev.decode_engine", "streamlev._engine_queries"],
    # what users build on the sketches (reference.py, the slow exact oracle, sits here so that no
    # lower layer can use it; ORACLE_USERS below says who may)
    "applications": ["streamlev.attention", "streamlev._attention_cost", "streamlev.selectors",
                     "streamlev.eval", "streamlev._eval_scores", "streamlev.testing",
                     "streamlev.datasets", "streamlev.reference", "streamlev.softmax_scores",
                     "streamlev._softmax_stream", "streamlev.softmax_selector"],
    # the public facade (streamlev/__init__.py)
    "api": ["streamlev"],
    # everything that talks to the outside world or to optional frameworks
    "integrations": ["streamlev.cli", "streamlev._cli_common", "streamlev._cli_select", "streamlev._cli_demo",
                     "streamlev.dask", "streamlev.torch", "streamlev._torch_attention",
                     "streamlev.__main__", "streamlev.hf.*", "streamlev.torch_engine", "streamlev._optional"],
}

# The only modules that may import the slow exact oracle: the test helpers shipped for users'
# suites, the evaluation harness and the CLI's brute-force demo all compare *against* it.
ORACLE_USERS = {"streamlev.testing", "streamlev.eval", "streamlev._cli_demo"}

THIRD_PARTY_CORE = {"numpy", "scipy", "numba"}
# Imported lazily (inside functions) because they are optional or slow to import.
OPTIONAL = {"torch", "transformers", "dask", "distributed", "matplotlib", "threadpoolctl", "tqdm", "safetensors",
            "hypothesis", "gguf", "accelerate"}

EDGES = edges()
FILES = module_names()


def test_every_module_is_in_the_layer_map():
    unmapped = [m for m in FILES if layer_of(m, LAYERS) is None]
    assert not unmapped, (f"module(s) {unmapped} are not in the layer map: add each to LAYERS at the top of "
                          "tests/test_layers.py (lowest layer that holds everything it imports).")


def test_layer_map_lists_each_module_once():
    seen = [p for names in LAYERS.values() for p in names]
    assert len(seen) == len(set(seen))


def test_imports_only_point_down():
    bad = upward(EDGES, LAYERS)
    names = list(LAYERS)
    assert not bad, "upward import(s): " + "; ".join(
        f"{e.src} ({names[layer_of(e.src, LAYERS)]}) imports {e.dst} ({names[layer_of(e.dst, LAYERS)]}) "
        f"at line {e.line}" for e in bad)


def test_no_import_cycles():
    assert cycles(EDGES) == []


def test_no_intra_package_imports_inside_functions():
    lazy = [f"{e.src}:{e.line} imports {e.dst}" for e in EDGES if e.in_function]
    assert not lazy, ("import streamlev modules at module level (lazy imports are for optional third-party "
                      "packages only): " + "; ".join(lazy))


def test_only_oracle_users_import_the_reference():
    users = {e.src for e in EDGES if e.dst == "streamlev.reference"}
    assert users <= ORACLE_USERS, f"{sorted(users - ORACLE_USERS)} import streamlev.reference (tests only)"


def test_core_imports_only_numpy_scipy_numba():
    """Core modules import numpy/scipy/numba (and the stdlib) at module level; optional packages only lazily."""
    import ast

    core = [m for m in FILES if layer_of(m, LAYERS) == 0]
    for mod in core:
        tree = ast.parse(FILES[mod].read_text())
        for node in tree.body:  # module level only: lazy imports of OPTIONAL packages are allowed in functions
            roots = _absolute_roots(node)
            foreign = {r for r in roots if r not in THIRD_PARTY_CORE and r not in _stdlib() and r != "streamlev"}
            assert not foreign, f"{mod}:{node.lineno} (core) imports {foreign}"


def test_lazy_imports_are_only_of_optional_packages():
    import ast

    for mod, path in FILES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    roots = _absolute_roots(inner)
                    assert roots <= OPTIONAL | _stdlib(), f"{mod}:{inner.lineno} lazily imports {roots - OPTIONAL}"


def _absolute_roots(node) -> set:
    """Top-level package names an import node brings in (empty for relative imports and non-imports)."""
    import ast

    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return {(node.module or "").split(".")[0]}
    return set()


def _stdlib():
    import sys

    return sys.stdlib_module_names | {"__future__"}


@pytest.mark.parametrize("mod", ["streamlev.sketch", "streamlev.lp", "streamlev.multihead", "streamlev.leverage",
                                 "streamlev.attention"])
def test_no_private_names_borrowed_across_the_sketch_modules(mod):
    """Shared machinery lives in the core or the base; a sibling's private names are not API."""
    import ast

    siblings = set(LAYERS["sketches"]) | set(LAYERS["offline"]) | set(LAYERS["applications"])
    tree = ast.parse(FILES[mod].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            target = f"streamlev.{node.module}"
            if target in siblings and not node.module.startswith("_"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{mod} imports private {private} from {target}"


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a core module importing a sketch is reported (so the tests above can fail)."""
    pkg = tmp_path / "streamlev"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_validation.py").write_text("from .sketch import LevSketch\n")
    (pkg / "sketch.py").write_text("def f():\n    from . import _validation\n")
    es = edges(pkg)
    assert [(e.src, e.dst) for e in upward(es, LAYERS)] == [("streamlev._validation", "streamlev.sketch")]
    assert cycles(es) == [["streamlev._validation", "streamlev.sketch"]]
    assert [e.in_function for e in es if e.src == "streamlev.sketch"] == [True]
