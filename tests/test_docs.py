"""The docs build, every public name is documented, and the guide's pages and links are in place."""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import streamlev

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_build():
    spec = importlib.util.spec_from_file_location("_docs_build", DOCS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(importlib.util.find_spec("pdoc") is None, reason="pdoc not installed (docs extra)")
def test_docs_build_with_one_command(tmp_path):
    out = tmp_path / "site"
    r = subprocess.run([sys.executable, str(DOCS / "build.py"), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    api = (out / "api" / "streamlev.html").read_text(encoding="utf-8")
    for name in streamlev.__all__:
        if name != "__version__":
            assert name in api, name
    assert (out / "api" / "streamlev" / "sketch.html").exists()
    assert (out / "api" / "streamlev" / "cli.html").exists()
    guide = (out / "guide.html").read_text(encoding="utf-8")
    assert "figures/budget_recall.png" in guide and (out / "figures" / "budget_recall.png").exists()
    assert 'href="data.html"' in guide  # .md links rewritten to the built pages


def test_build_fails_loudly_on_a_broken_link(tmp_path):
    build = _load_build()
    page = tmp_path / "page.md"
    page.write_text("see [this](missing.md) and [web](https://example.org) and [api](api/streamlev.html)\n")
    with pytest.raises(RuntimeError, match="missing.md"):
        build.check_links([page])
    build.check_links([DOCS / "index.md", DOCS / "guide.md", DOCS / "data.md"])  # the real pages are clean


def test_build_fails_loudly_on_an_import_error(tmp_path, monkeypatch):
    build = _load_build()
    pkg = tmp_path / "brokenpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A package."""\n')
    (pkg / "bad.py").write_text("import this_module_does_not_exist_anywhere\n")
    monkeypatch.setattr(build, "PACKAGE", "brokenpkg")
    monkeypatch.setattr(build, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ModuleNotFoundError, match="this_module_does_not_exist_anywhere"):
        build.public_modules()
    for name in ("brokenpkg", "brokenpkg.bad"):
        sys.modules.pop(name, None)


def _public_methods(cls):
    for name, obj in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if inspect.isfunction(obj) or isinstance(obj, property):
            yield name, obj


def _takes_parameters(func) -> bool:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "cls") for p in sig.parameters.values())


@pytest.mark.parametrize("name", [n for n in streamlev.__all__ if n != "__version__"])
def test_every_public_name_is_documented(name):
    obj = getattr(streamlev, name)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"streamlev.{name} has no docstring"
    if inspect.isclass(obj):
        init = vars(obj).get("__init__")
        if init is not None and _takes_parameters(init):
            assert re.search(r"^Parameters\n-+", doc + "\n" + (inspect.getdoc(init) or ""), re.M), \
                f"streamlev.{name}: constructor parameters are not documented in a Parameters section"
        undocumented = [m for m, f in _public_methods(obj) if not (inspect.getdoc(f) or "").strip()]
        assert not undocumented, f"streamlev.{name}: methods without a docstring: {undocumented}"
    else:
        assert callable(obj), name
        if _takes_parameters(obj):
            assert re.search(r"^Parameters\n-+", doc, re.M), f"streamlev.{name} has no Parameters section"


def test_cli_main_is_documented():
    from streamlev import cli

    assert re.search(r"^Parameters\n-+", inspect.getdoc(cli.main), re.M)


def test_guide_states_the_guarantee_and_its_limits():
    guide = (DOCS / "guide.md").read_text(encoding="utf-8")
    for phrase in ("No false negatives", "floor(d / eps)", "rtol = 1e-13", "Softmax has no universal set",
                   "t * k_j", "does not bound the attention mass", "mean leverage is rank/n",
                   "return_changes=True", "mutates `self` and never its argument", "disjoint",
                   "LpSketch", "internal lock"):
        assert phrase in guide, phrase
    for fig in ("figures/budget_recall.png", "figures/leverage_real_heads.png"):
        assert fig in guide and (DOCS / fig).stat().st_size < 400_000
