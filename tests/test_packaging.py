"""The package ships its type marker (PEP 561): streamlev/py.typed exists and is declared as package data."""

from __future__ import annotations

import fnmatch
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_py_typed_marker_ships():
    assert (ROOT / "streamlev" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["streamlev"]
    assert any(fnmatch.fnmatch("py.typed", pat) for pat in patterns)
