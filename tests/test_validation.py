"""Bad input gets a clear error and the sketch is left bit-for-bit unchanged."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamlev as sl
from streamlev.testing import make_keys


@pytest.fixture
def sketch():
    sk = sl.LevSketch(4, 0.1)
    sk.update(make_keys("heavy_tailed", 60, 4, 0))
    return sk


def _nan_block():
    K = np.ones((5, 4))
    K[2, 1] = np.nan
    return K


def _inf_late_chunk():
    K = np.random.default_rng(0).standard_normal((9000, 4))
    K[8500, 0] = np.inf  # in the third internal chunk: earlier chunks must be rolled back
    return K


BAD_UPDATES = [
    (dict(keys=_nan_block()), ValueError, "NaN or Inf"),
    (dict(keys=_inf_late_chunk()), ValueError, "NaN or Inf"),
    (dict(keys=np.ones((3, 5))), ValueError, "has 5 columns but this sketch was built with d=4"),
    (dict(keys=np.ones((2, 3, 4))), ValueError, "must be 2-D"),
    (dict(keys=np.ones((3, 4), dtype=complex)), TypeError, "real numbers"),
    (dict(keys=np.array([["a"] * 4])), TypeError, "real numbers"),
    (dict(keys=np.array([[object()] * 4])), TypeError, "real numbers"),
    (dict(keys=np.ones((2, 4)), ids=[0.5, 1.0]), TypeError, "ids must be integers"),
    (dict(keys=np.ones((2, 4)), ids=["a", "b"]), TypeError, "ids must be integers"),
    (dict(keys=np.ones((2, 4)), ids=[7, 7]), ValueError, "distinct within a block"),
    (dict(keys=np.ones((2, 4)), ids=[1, 2, 3]), ValueError, "one id per key"),
    (dict(keys=np.ones((2, 4)), values=np.ones((3, 2))), ValueError, "for every key or for none"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_UPDATES)
def test_bad_update_raises_and_changes_nothing(sketch, kwargs, exc, match):
    before = sketch.to_bytes()
    with pytest.raises(exc, match=match):
        sketch.update(**kwargs)
    assert sketch.to_bytes() == before


def test_id_equal_to_retained_id_is_rejected(sketch):
    rid = int(sketch.universal_set()[0])
    before = sketch.to_bytes()
    with pytest.raises(ValueError, match="already retained"):
        sketch.update(np.ones((2, 4)), ids=[10_000, rid])
    with pytest.raises(ValueError, match="already retained"):
        sketch.update(np.ones(4), ids=[rid])
    assert sketch.to_bytes() == before


def test_values_must_be_given_consistently():
    sk = sl.LevSketch(2, 0.5).update(np.eye(2), values=np.ones((2, 3)))
    before = sk.to_bytes()
    with pytest.raises(ValueError, match="carries values"):
        sk.update(np.ones((1, 2)))
    with pytest.raises(ValueError, match="columns but earlier values had 3"):
        sk.update(np.ones((1, 2)), values=np.ones((1, 2)))
    assert sk.to_bytes() == before
    with pytest.raises(ValueError, match="one row per key"):
        sk.update(np.ones((2, 2)), values=np.ones((3, 3)))
    plain = sl.LevSketch(2, 0.5).update(np.eye(2))
    with pytest.raises(ValueError, match="for every key or for none"):
        plain.update(np.ones((1, 2)), values=np.ones((1, 1)))


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, np.nan, np.inf])
def test_eps_out_of_range(eps):
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        sl.LevSketch(3, eps)
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        sl.universal_set(np.eye(3), eps)


@pytest.mark.parametrize("eps", ["0.1", None, True])
def test_eps_wrong_type(eps):
    with pytest.raises(TypeError, match="real number"):
        sl.LevSketch(3, eps)


@pytest.mark.parametrize("d,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("4", TypeError)])
def test_bad_dimension(d, exc):
    with pytest.raises(exc, match="int >= 1"):
        sl.LevSketch(d, 0.1)


def test_query_eps_below_sketch_eps(sketch):
    with pytest.raises(ValueError, match="below the sketch's eps"):
        sketch.universal_set(0.01)


@pytest.mark.parametrize("other,match", [
    (sl.LevSketch(5, 0.1), "incompatible sketches"),
    (sl.LevSketch(4, 0.2), "incompatible sketches"),
    (sl.LevSketch(4, 0.1, rtol=1e-10), "incompatible sketches"),
])
def test_incompatible_merge(sketch, other, match):
    other.update(np.eye(other.d), ids=np.arange(1000, 1000 + other.d))
    before, other_before = sketch.to_bytes(), other.to_bytes()
    with pytest.raises(ValueError, match=match):
        sketch.merge(other)
    assert sketch.to_bytes() == before and other.to_bytes() == other_before


def test_merge_wrong_type_and_overlapping_ids(sketch):
    before = sketch.to_bytes()
    with pytest.raises(TypeError, match="another LevSketch"):
        sketch.merge("not a sketch")
    clone = sl.LevSketch.from_bytes(before)
    with pytest.raises(ValueError, match="retained by both sketches"):
        sketch.merge(clone)
    with pytest.raises(ValueError, match="with itself"):
        sketch.merge(sketch)
    assert sketch.to_bytes() == before


def test_other_p_is_rejected_with_a_pointer():
    with pytest.raises(ValueError, match="p=2"):
        sl.LevSketch(3, 0.1, p=1.0)


def test_out_of_range_dynamic_is_rejected_cleanly():
    sk = sl.LevSketch(2, 0.1).update(np.array([[1e-300, 0.0]]))
    before = sk.to_bytes()
    with pytest.raises(ValueError, match="float64"):
        sk.update(np.array([[0.0, 1e300]]))
    assert sk.to_bytes() == before


@given(data=st.binary(max_size=300))
def test_from_bytes_on_garbage_raises_value_error(data):
    with pytest.raises(ValueError):
        sl.LevSketch.from_bytes(data)


def test_from_bytes_on_corrupted_truncated_and_foreign_bytes(sketch):
    good = sketch.to_bytes()
    with pytest.raises(TypeError, match="expected bytes"):
        sl.LevSketch.from_bytes("not bytes")
    for bad in (good[:-1], good[:10], good + b"\0", b"SLEV" + good[4:20], b"PK\x03\x04" + good[4:]):
        with pytest.raises(ValueError):
            sl.LevSketch.from_bytes(bad)
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = bytearray(good)
        pos = int(rng.integers(0, len(b)))
        b[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(ValueError):
            sl.LevSketch.from_bytes(bytes(b))


def test_absurd_sizes_do_not_allocate():
    import struct
    import zlib

    body = (b"SLEV" + struct.pack("<H", 1) + bytes([9]) + b"LevSketch" + struct.pack("<H", 1)
            + bytes([1]) + b"R" + struct.pack("<BB", 1, 2) + struct.pack("<2Q", 2**60, 2**60))
    data = body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        sl.LevSketch.from_bytes(data)


def test_reused_id_ranges_are_caught_even_after_eviction():
    K = make_keys("gaussian", 500, 3, 0)
    a = sl.LevSketch(3, 0.2).update(K[:250])
    b = sl.LevSketch(3, 0.2).update(K[250:])  # forgot ids=: both count from 0
    before = a.to_bytes()
    with pytest.raises(ValueError, match="ids overlap"):
        a.merge(b)
    with pytest.raises(ValueError, match="were already used"):
        a.update(K[:5], ids=np.arange(10, 15))  # ids 10..14 were evicted long ago, but are known taken
    assert a.to_bytes() == before
    a.merge(sl.LevSketch(3, 0.2).update(K[250:], ids=np.arange(250, 500)))
    assert a.n == 500
    # interleaved shards (not intervals) stay legal
    ev = sl.LevSketch(3, 0.2).update(K[::2], ids=np.arange(0, 500, 2))
    od = sl.LevSketch(3, 0.2).update(K[1::2], ids=np.arange(1, 500, 2))
    np.testing.assert_array_equal(ev.merge(od).universal_set(), sl.universal_set(K, 0.2))
