"""Run the code blocks of docs/distributed.md, so the recipes cannot drift from the code.

A block preceded by ``<!-- test: ENGINE -->`` is executed with the other blocks
of that engine, in order, in one namespace, inside a temporary directory.
Ray and Spark start slowly (tens of seconds), so their blocks are ``slow``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
_BLOCK = re.compile(r"<!-- test: (\w+) -->\s*```python\n(.*?)```", re.S)


def blocks(engine: str) -> list[str]:
    return [code for eng, code in _BLOCK.findall(DOC.read_text()) if eng == engine]


def run_blocks(engine, tmp_path, monkeypatch):
    code = blocks(engine)
    assert code, f"no '{engine}' blocks in {DOC}"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for i, src in enumerate(code):
        exec(compile(src, f"{DOC.name}[{engine} block {i}]", "exec"), namespace)


def test_every_python_block_is_tagged():
    tagged = sum(len(blocks(e)) for e in ("dask", "ray", "spark"))
    assert tagged == DOC.read_text().count("```python")


def test_dask_recipes(tmp_path, monkeypatch):
    pytest.importorskip("dask.array")
    pytest.importorskip("distributed")
    run_blocks("dask", tmp_path, monkeypatch)


@pytest.mark.slow
def test_ray_recipe(tmp_path, monkeypatch):
    pytest.importorskip("ray.data")
    run_blocks("ray", tmp_path, monkeypatch)


def _has_java() -> bool:
    if shutil.which("java") is None:
        return False
    return subprocess.run(["java", "-version"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_spark_recipe(tmp_path, monkeypatch):
    pytest.importorskip("pyspark")
    if not _has_java():
        pytest.skip("pyspark needs a Java runtime")
    run_blocks("spark", tmp_path, monkeypatch)
