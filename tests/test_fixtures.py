"""Frozen format-v1 bytes (tests/fixtures/v1, written by the code that defined v1) must load forever.

A format change that breaks these files is a compatibility break: add a new
version directory and keep reading v1, never regenerate these files.
"""

from __future__ import annotations

import json
import pathlib
import struct
import zlib

import numpy as np
import pytest

import streamlev as sl
from streamlev.embedding import LpEmbedding

from .fixtures.v1.generate import contents

V1 = pathlib.Path(__file__).resolve().parent / "fixtures" / "v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())
CLASSES = {c.__name__: c for c in (sl.LevSketch, sl.LpSketch, LpEmbedding, sl.MultiHeadSketch,
                                   sl.ShiftInvariantSketch, sl.QuerySketch)}


def _close(got, want, path="") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list) and want and isinstance(want[0], (list, dict)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, list) and want and isinstance(want[0], float):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=path)
    else:
        assert got == want, path


def test_every_sketch_kind_has_a_fixture():
    assert {v["class"] for v in EXPECTED.values()} == set(CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_v1_fixture_loads_with_its_contents_and_round_trips(name):
    data = (V1 / f"{name}.bin").read_bytes()
    cls = CLASSES[EXPECTED[name]["class"]]
    sk = cls.from_bytes(data)
    _close(contents(name, sk), EXPECTED[name])
    assert sk.to_bytes() == data  # the writer still produces v1, byte for byte


@pytest.mark.parametrize("version", [0, 2, 65535])
def test_unknown_version_is_a_clear_error(version):
    data = (V1 / "lev.bin").read_bytes()
    body = data[:4] + struct.pack("<H", version) + data[6:-4]
    bad = body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
    with pytest.raises(ValueError, match=rf"unsupported format version {version}; this streamlev reads version 1"):
        sl.LevSketch.from_bytes(bad)
