"""Fuzzing of ``LevSketch.from_bytes``: every input round-trips or raises ValueError.

TypeError is allowed only for input that is not bytes-like. Mutations are made
both blind (hypothesis binary strategies, bit flips, truncation) and
structured, with a *valid* CRC recomputed so that the size, shape and value
checks (not the checksum) must reject them. A coverage-guided fuzzer lives in
``benchmarks/fuzz_from_bytes.py``.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamlev as sl
from streamlev import _format
from streamlev.testing import make_keys


def _small_sketch():
    K = make_keys("heavy_tailed", 40, 3, 0)
    return sl.LevSketch(3, 0.2).update(K)


SMALL = _small_sketch().to_bytes()
EMPTY = sl.LevSketch(2, 0.5).to_bytes()


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _field(name: str, code: int, shape, raw: bytes = b"") -> bytes:
    nb = name.encode("ascii")
    return (struct.pack("<B", len(nb)) + nb + struct.pack("<BB", code, len(shape))
            + struct.pack(f"<{len(shape)}Q", *shape) + raw)


def _container(fields, kind="LevSketch", version=1, count=None) -> bytes:
    """Bytes with a valid CRC built from raw field encodings (see streamlev/_format.py's layout)."""
    kb = kind.encode("ascii")
    body = (_format.MAGIC + struct.pack("<H", version) + struct.pack("<B", len(kb)) + kb
            + struct.pack("<H", len(fields) if count is None else count) + b"".join(fields))
    return _with_crc(body)


def _scalar_fields(d=2, eps=0.5, n=0, e=-1100):
    return [_field("d", 2, (), struct.pack("<q", d)), _field("eps", 1, (), struct.pack("<d", eps)),
            _field("p", 1, (), struct.pack("<d", 2.0)), _field("rtol", 1, (), struct.pack("<d", 1e-13)),
            _field("n", 2, (), struct.pack("<q", n)), _field("scale_exp", 2, (), struct.pack("<q", e)),
            _field("id_range", 2, (2,), struct.pack("<2q", 0, n - 1))]


def check_decode(data):
    """The contract: decode and round-trip, or ValueError; TypeError only for non-bytes input."""
    bytes_like = isinstance(data, (bytes, bytearray, memoryview))
    try:
        sk = sl.LevSketch.from_bytes(data)
    except ValueError:
        return None
    except TypeError:
        assert not bytes_like, "TypeError for bytes-like input"
        return None
    assert bytes_like
    b = sk.to_bytes()
    sk2 = sl.LevSketch.from_bytes(b)
    assert sk2.to_bytes() == b  # re-encoding is a fixed point
    ids, tau = sk.scores()
    assert np.isfinite(tau).all() and np.all(tau >= sk.eps) and np.all(tau <= 1.0)
    assert sk.num_retained <= sl.LevSketch.max_retained(sk.d, sk.eps) and sk.num_retained <= sk.n
    return sk


# ------------------------------------------------------------ valid input
def test_valid_bytes_round_trip_bit_identically():
    for b in (SMALL, EMPTY, bytearray(SMALL), memoryview(SMALL)):
        assert check_decode(b).to_bytes() == bytes(b)


# ------------------------------------------------------------ blind fuzzing
@given(st.binary(max_size=512))
def test_random_bytes(data):
    check_decode(data)


@given(st.binary(max_size=256))
def test_random_bytes_behind_a_valid_magic_and_crc(tail):
    check_decode(_with_crc(_format.MAGIC + struct.pack("<H", 1) + tail))


@given(prefix=st.integers(0, len(SMALL)), junk=st.binary(max_size=64))
def test_valid_prefix_plus_random_tail_with_valid_crc(prefix, junk):
    check_decode(_with_crc(SMALL[:-4][:prefix] + junk))


@given(st.data())
def test_random_byte_edits_of_valid_bytes(data):
    b = bytearray(SMALL[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    check_decode(_with_crc(bytes(b)))  # CRC fixed: the structural checks must do the work
    check_decode(bytes(b) + SMALL[-4:])  # CRC stale: must be rejected
    if bytes(b) != SMALL[:-4]:
        with pytest.raises(ValueError):
            sl.LevSketch.from_bytes(bytes(b) + SMALL[-4:])


# ------------------------------------------------------------ structured mutations
def test_truncation_at_every_length():
    for k in range(len(SMALL)):
        with pytest.raises(ValueError):
            sl.LevSketch.from_bytes(SMALL[:k])
        check_decode(_with_crc(SMALL[:-4][:k]))  # truncated but re-checksummed


def test_every_single_bit_flip_is_detected_by_the_checksum():
    for i in range(len(SMALL) * 8):
        b = bytearray(SMALL)
        b[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ValueError):
            sl.LevSketch.from_bytes(bytes(b))


def test_every_single_bit_flip_with_a_valid_crc_decodes_sanely_or_raises():
    accepted = 0
    for i in range((len(SMALL) - 4) * 8):
        b = bytearray(SMALL[:-4])
        b[i // 8] ^= 1 << (i % 8)
        accepted += check_decode(_with_crc(bytes(b))) is not None
    assert accepted < len(SMALL) * 8  # most flips hit structure; value flips may decode


@pytest.mark.parametrize("version", [0, 2, 255, 65535])
def test_wrong_version(version):
    body = bytearray(SMALL[:-4])
    body[4:6] = struct.pack("<H", version)
    with pytest.raises(ValueError, match="version"):
        sl.LevSketch.from_bytes(_with_crc(bytes(body)))


@pytest.mark.parametrize("kind", ["LpSketch", "", "levsketch", "LevSketch\x00", "X" * 255])
def test_wrong_kind(kind):
    f = sl.LevSketch.from_bytes(SMALL)
    fields = {"d": np.int64(f.d), "eps": np.float64(f.eps), "p": np.float64(2.0), "rtol": np.float64(f.rtol),
              "n": np.int64(f.n), "scale_exp": np.int64(-1100), "R": np.zeros((f.d, f.d)),
              "ids": np.zeros(0, np.int64), "keys": np.zeros((0, f.d))}
    with pytest.raises(ValueError):
        sl.LevSketch.from_bytes(_format.dump(kind, fields))


def test_non_ascii_kind_and_field_names():
    body = bytearray(EMPTY[:-4])
    body[7] = 0xFF  # first byte of the kind string
    with pytest.raises(ValueError):
        sl.LevSketch.from_bytes(_with_crc(bytes(body)))
    bad = _container([_field("\u00e9".encode("latin-1").decode("ascii", "replace").replace("\ufffd", "?"),
                             2, ())])
    with pytest.raises(ValueError):
        sl.LevSketch.from_bytes(bad)


ABSURD = {
    "R 2^60 x 2^60, no data": _scalar_fields(d=2**60) + [_field("R", 1, (2**60, 2**60))],
    "R 2^62 x 4 (size*8 overflows int64)": _scalar_fields() + [_field("R", 1, (2**62, 4))],
    "R 2^64-1 x 2^64-1": _scalar_fields() + [_field("R", 1, (2**64 - 1, 2**64 - 1))],
    "keys 2^60 x 0 (zero bytes)": _scalar_fields() + [_field("R", 1, (2, 2), bytes(32)),
                                                      _field("ids", 2, (0,)), _field("keys", 1, (2**60, 0))],
    "keys 2^64-1 x 0 (zero bytes)": _scalar_fields() + [_field("R", 1, (2, 2), bytes(32)),
                                                        _field("ids", 2, (0,)), _field("keys", 1, (2**64 - 1, 0))],
    "ids 2^60 (no data)": _scalar_fields() + [_field("R", 1, (2, 2), bytes(32)), _field("ids", 2, (2**60,))],
    "d = 2^60 with consistent empty arrays": _scalar_fields(d=2**60) + [
        _field("R", 1, (2**60, 0)), _field("ids", 2, (0,)), _field("keys", 1, (0, 2**60))],
    "d = 2^31 R 2^31 x 0": _scalar_fields(d=2**31) + [
        _field("R", 1, (2**31, 0)), _field("ids", 2, (0,)), _field("keys", 1, (0, 2**31))],
    "n negative": _scalar_fields(n=-5, e=0) + [
        _field("R", 1, (2, 2), np.eye(2).tobytes()), _field("ids", 2, (0,)), _field("keys", 1, (0, 2))],
    "d negative": _scalar_fields(d=-3) + [_field("R", 1, (0, 0)), _field("ids", 2, (0,)), _field("keys", 1, (0, 0))],
    "d zero": _scalar_fields(d=0) + [_field("R", 1, (0, 0)), _field("ids", 2, (0,)), _field("keys", 1, (0, 0))],
    "scale exponent 2^62": _scalar_fields(n=1, e=2**62) + [
        _field("R", 1, (2, 2), np.eye(2).tobytes()), _field("ids", 2, (0,)), _field("keys", 1, (0, 2))],
    "eps NaN": _scalar_fields(eps=float("nan")) + [
        _field("R", 1, (2, 2), bytes(32)), _field("ids", 2, (0,)), _field("keys", 1, (0, 2))],
    "ndim 3": _scalar_fields() + [_field("R", 1, (2, 2, 2), bytes(64))],
    "dtype code 9": _scalar_fields() + [_field("R", 9, (2, 2), bytes(32))],
    "field count 65535": None,
    "repeated field": _scalar_fields() + [_field("d", 2, (), bytes(8))],
    "unknown field": _scalar_fields() + [_field("zzz", 2, (), bytes(8))],
    "missing fields": _scalar_fields(),
    "R lower-triangular": _scalar_fields(n=1, e=0) + [
        _field("R", 1, (2, 2), np.array([[1.0, 0], [1, 1]]).tobytes()), _field("ids", 2, (0,)),
        _field("keys", 1, (0, 2))],
    "R with Inf": _scalar_fields(n=1, e=0) + [
        _field("R", 1, (2, 2), np.array([[np.inf, 0], [0, 1]]).tobytes()), _field("ids", 2, (0,)),
        _field("keys", 1, (0, 2))],
    "retained > n": _scalar_fields(n=1, e=0) + [
        _field("R", 1, (2, 2), np.eye(2).tobytes()), _field("ids", 2, (2,), np.arange(2).tobytes()),
        _field("keys", 1, (2, 2), np.eye(2).tobytes())],
    "unsorted ids": _scalar_fields(n=2, e=0) + [
        _field("R", 1, (2, 2), np.eye(2).tobytes()), _field("ids", 2, (2,), np.array([1, 0]).tobytes()),
        _field("keys", 1, (2, 2), np.eye(2).tobytes())],
    "retained > max_retained": _scalar_fields(d=1, eps=1.0, n=5, e=0) + [
        _field("R", 1, (1, 1), np.ones((1, 1)).tobytes()), _field("ids", 2, (2,), np.arange(2).tobytes()),
        _field("keys", 1, (2, 1), np.ones((2, 1)).tobytes())],
    "trailing bytes": _scalar_fields() + [_field("R", 1, (2, 2), bytes(32)), _field("ids", 2, (0,)),
                                          _field("keys", 1, (0, 2)), b"\x00" * 7],
}


@pytest.mark.parametrize("name", sorted(ABSURD))
def test_absurd_headers_with_valid_crc_are_rejected_without_allocation(name):
    fields = ABSURD[name]
    data = (_container(_scalar_fields(), count=65535) if fields is None else _container(fields))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(ValueError):
            sl.LevSketch.from_bytes(data)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{name}: decoding allocated {peak} bytes"


def test_largest_n_is_a_legal_header():
    data = _container(_scalar_fields(n=2**63 - 1, e=0) + [
        _field("R", 1, (2, 2), np.eye(2).tobytes()), _field("ids", 2, (0,)), _field("keys", 1, (0, 2))])
    assert check_decode(data).to_bytes() == data


def test_huge_consistent_shapes_are_bounded_by_the_bytes_present():
    # a sketch of d = 1024 is 8 MiB of R; claiming d = 2^20 would need 8 TiB of bytes present
    data = _container(_scalar_fields(d=2**20) + [_field("R", 1, (2**20, 2**20), bytes(64))])
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="truncated"):
            sl.LevSketch.from_bytes(data)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------ foreign data
def _foreign():
    sk = _small_sketch()
    out = {"empty": b"", "magic only": _format.MAGIC, "magic+crc": _with_crc(_format.MAGIC),
           "pickle of the sketch": pickle.dumps(sk), "pickle of the bytes": pickle.dumps(SMALL),
           "json": json.dumps({"d": 3}).encode(), "gzip of valid bytes": gzip.compress(SMALL),
           "valid bytes twice": SMALL + SMALL, "utf-16 text": "SLEV sketch".encode("utf-16"),
           "zeros 1 MiB": bytes(2**20), "0xff 4 KiB": b"\xff" * 4096}
    buf = io.BytesIO()
    np.savez(buf, R=np.eye(3))
    out["npz"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("sketch.bin", SMALL)
    out["zip containing valid bytes"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(SMALL, np.uint8))
    out["npy of valid bytes"] = buf.getvalue()
    try:
        from safetensors.numpy import save

        out["safetensors"] = save({"R": np.eye(3)})
    except ImportError:  # pragma: no cover - safetensors is in the test extra
        pass
    return out


FOREIGN = _foreign()


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_data_is_rejected(name):
    with pytest.raises(ValueError):
        sl.LevSketch.from_bytes(FOREIGN[name])


@pytest.mark.parametrize("obj", [None, "SLEV", 42, [1, 2], np.frombuffer(SMALL, np.uint8), io.BytesIO(SMALL),
                                 sl.LevSketch(2, 0.5)])
def test_non_bytes_input_raises_type_error(obj):
    with pytest.raises(TypeError):
        sl.LevSketch.from_bytes(obj)


def test_non_contiguous_memoryview():
    a = np.frombuffer(SMALL + SMALL, np.uint8)[::2]
    # a bytes-like object the decoder cannot read in place: a clear error, never a crash
    with pytest.raises((ValueError, TypeError)):
        sl.LevSketch.from_bytes(memoryview(a))


def test_memoryview_of_other_item_size_round_trips():
    pad = SMALL + bytes((-len(SMALL)) % 8)
    mv = memoryview(np.frombuffer(pad, np.float64))  # format 'd', itemsize 8
    with pytest.raises(ValueError):  # padding changes the bytes: checksum
        sl.LevSketch.from_bytes(mv)
    if len(SMALL) % 8 == 0:  # pragma: no cover - depends on the sketch size
        check_decode(mv)


# ------------------------------------------------- regressions: bugs this fuzzing found (fixed)
def test_subnormal_eps_in_header_raises_value_error():
    # was OverflowError: d / eps overflowed in max_retained
    data = _container(_scalar_fields(eps=5e-324) + [
        _field("R", 1, (2, 2), bytes(32)), _field("ids", 2, (0,)), _field("keys", 1, (0, 2))])
    with pytest.raises(ValueError):
        sl.LevSketch.from_bytes(data)


def test_subnormal_eps_is_rejected_or_works():
    try:
        sk = sl.LevSketch(2, 5e-324)
    except ValueError:
        return
    sk.update(np.eye(2))
    assert sk.num_retained == 2


def test_factor_larger_than_any_sketch_can_hold_is_rejected():
    fields = {"d": np.int64(2), "eps": np.float64(0.5), "p": np.float64(2.0), "rtol": np.float64(1e-13),
              "n": np.int64(3), "scale_exp": np.int64(0), "id_range": np.array([0, 2]),
              "R": np.array([[1e300, 0], [0, 1.0]]),
              "ids": np.array([0, 1]), "keys": np.array([[0.5, 0], [0, 0.5]])}
    with pytest.raises(ValueError, match="exceeds what 3 scaled keys"):
        with np.errstate(all="ignore"):
            sl.LevSketch.from_bytes(_format.dump("LevSketch", fields))
