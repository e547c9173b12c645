"""DecodeEngine: exact sets against the SVD reference and LevSketch, changes, atomic errors, bytes."""

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamlev as sl
from streamlev import reference as ref
from streamlev._engine_store import from_float64, to_float64
from streamlev.decode_engine import BatchChanges, DecodeEngine
from streamlev.testing import KINDS, make_keys, random_partition

from ._compare import assert_matches_reference

DTYPES = ("float64", "float32", "float16", "bfloat16")


class _Slot:
    """One sketch of an engine seen through the LevSketch query interface (for assert_matches_reference)."""

    def __init__(self, eng, s):
        self.eng, self.s = eng, s
        self.d, self.eps = eng.d, float(eng.eps[s])
        self.n, self.num_retained = int(eng.n[s]), int(eng.num_retained[s])

    @staticmethod
    def max_retained(d, eps):
        return sl.LevSketch.max_retained(d, eps)

    def scores(self):
        return self.eng.scores(head=self.s)

    def universal_set(self, e=None):
        return self.eng.universal_set(e, head=self.s)


def _stored(K, dtype):
    return to_float64(from_float64(K, dtype), dtype)


def _heavy(S, n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((S, n, d)) * rng.lognormal(0.0, 1.0, (S, n, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_sets_equal_reference_and_levsketch(dtype):
    S, d, eps, n = 4, 8, 0.15, 400
    K = _heavy(S, n, d, 1)
    eng = DecodeEngine(S, d, eps, dtype=dtype)
    sks = [sl.LevSketch(d, eps) for _ in range(S)]
    Kst = _stored(K, dtype)
    pos = 0
    for m in [30] + [1] * 150 + [3, 2, 8] * 10 + [1] * 80:  # prefill, single tokens, small blocks
        eng.update(K[:, pos : pos + m])
        for s in range(S):
            sks[s].update(Kst[s, pos : pos + m])
        pos += m
    for s in range(S):
        np.testing.assert_array_equal(eng.universal_set(head=s), sks[s].universal_set())
        np.testing.assert_array_equal(eng.universal_set(head=s), ref.universal_set(Kst[s, :pos], eps))
        assert_matches_reference(_Slot(eng, s), Kst[s, :pos], eps_list=[eps, 0.3])
    assert np.all(eng.num_retained <= eng.max_retained())


@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3), n=st.integers(1, 70),
       d=st.integers(1, 6), seed=st.integers(0, 2**31), dtype=st.sampled_from(["float64", "float32"]))
@settings(max_examples=25, deadline=None)
def test_engine_matches_reference_on_adversarial_keys(kinds, n, d, seed, dtype):
    S = len(kinds)
    K = np.stack([make_keys(k, n, d, seed + s) for s, k in enumerate(kinds)])
    if dtype == "float32":
        K = np.clip(K, -1e30, 1e30)  # float32 range; tiny keys round to zero or subnormals
    eps = np.linspace(0.1, 0.4, S)
    eng = DecodeEngine(S, d, eps, dtype=dtype)
    for a, b in random_partition(n, seed):
        for i in range(a, b, 1 if (b - a) < 20 else b - a):  # most blocks token by token
            eng.update(K[:, i : b if (b - a) >= 20 else i + 1])
    Kst = _stored(K, dtype)
    for s in range(S):
        assert_matches_reference(_Slot(eng, s), Kst[s], eps_list=[float(eps[s])])


def test_changes_are_the_set_differences():
    S, d, eps = 3, 6, 0.2
    K = _heavy(S, 300, d, 2)
    eng = DecodeEngine(S, d, eps, dtype="float32")
    eng.update(K[:, :20])
    for i in range(20, 300, 2):
        before = eng.keep_mask(300)
        ch = eng.update(K[:, i : i + 2], return_changes=True)
        after = eng.keep_mask(300)
        assert isinstance(ch, BatchChanges)
        want_add = np.argwhere(after & ~before)
        want_ev = np.argwhere(before & ~after)
        np.testing.assert_array_equal(np.c_[ch.added_sketch, ch.added_id], want_add)
        np.testing.assert_array_equal(np.c_[ch.evicted_sketch, ch.evicted_id], want_ev)
    for s in range(S):
        np.testing.assert_array_equal(np.flatnonzero(eng.keep_mask(300)[s]), eng.universal_set(head=s))


def test_payload_ids_and_retained_in_storage_precision():
    S, d, dv = 2, 4, 3
    rng = np.random.default_rng(3)
    K = rng.standard_normal((S, 60, d)).astype(np.float32)
    V = rng.standard_normal((S, 60, dv))
    eng = DecodeEngine(S, d, 0.3, dtype="float16", value_dim=dv)
    ids = 1000 + np.arange(60)
    eng.update(K[:, :10], values=V[:, :10], ids=ids[:10])
    for i in range(10, 60):
        eng.update(K[:, i], values=V[:, i], ids=ids[i : i + 1])
    for s in range(S):
        got, keys, vals = eng.retained(head=s)
        assert keys.dtype == np.float16 and vals.dtype == np.float16
        rows = got - 1000
        np.testing.assert_array_equal(keys, K[s, rows].astype(np.float16))
        np.testing.assert_array_equal(vals, V[s, rows].astype(np.float16))
        np.testing.assert_array_equal(got, 1000 + ref.universal_set(_stored(K[s], "float16"), 0.3))


def test_widening_is_exact_for_half_and_bfloat16_including_subnormals():
    from streamlev._kernels.batched_decode import widen_row as widen

    vals = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6e-8, -3e-6, 6.1e-5, 1e-38, -3.3e38, 1e-40])
    for kind, half in (("float16", True), ("bfloat16", False)):
        with np.errstate(over="ignore"):
            st = from_float64(vals, kind)
        want = to_float64(st, kind)
        ok = np.isfinite(want)
        out = np.empty(ok.sum())
        widen(np.ascontiguousarray(st[ok]).view(np.uint16), out, out.size, half, np.empty(out.size, np.uint32))
        np.testing.assert_array_equal(out, want[ok])


def _bad_calls(eng, S, d):
    good = np.ones((S, 1, d))
    nan = good.copy()
    nan[-1, 0, 0] = np.nan
    return [
        (ValueError, dict(keys=nan)),
        (ValueError, dict(keys=np.ones((S + 1, 1, d)))),
        (ValueError, dict(keys=np.ones((S, 1, d + 1)))),
        (ValueError, dict(keys=np.ones((S, 2, 2, d)))),
        (TypeError, dict(keys=np.ones((S, 1, d), complex))),
        (ValueError, dict(keys=np.ones((S, 2, d)), ids=[7, 7])),
        (TypeError, dict(keys=good, ids=[0.5])),
        (ValueError, dict(keys=good, ids=[3])),  # already used
        (ValueError, dict(keys=good, values=np.ones((S, 1, 2)))),  # no payload in this engine
    ]


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_bad_input_leaves_every_sketch_unchanged(dtype):
    S, d = 3, 4
    eng = DecodeEngine(S, d, 0.2, dtype=dtype)
    eng.update(_heavy(S, 30, d, 4))
    for i in range(5):
        eng.update(_heavy(S, 1, d, 10 + i))
    snap = eng.copy()
    for exc, kw in _bad_calls(eng, S, d):
        with pytest.raises(exc) as info:
            eng.update(**kw)
        assert "DecodeEngine.update" in str(info.value)
        assert eng == snap
    if dtype == "float16":
        with pytest.raises(ValueError, match="NaN or Inf"):  # 1e6 overflows float16
            eng.update(np.full((S, 1, d), 1e6))
        assert eng == snap


def test_float64_rescaling_failure_rolls_back_all_sketches():
    S, d = 2, 3
    eng = DecodeEngine(S, d, 0.3, dtype="float64")
    eng.update(_heavy(S, 10, d, 5))
    snap = eng.copy()
    K = np.ones((S, 1, d))
    K[1] *= 1e306  # LevSketch refuses keys > 2**1000 times the earlier ones
    K[1] *= 1e2
    with pytest.raises(ValueError):
        eng.update(np.concatenate([np.ones((S, 1, d)), K], axis=1))
    assert eng == snap


def test_bytes_pickle_copy_merge_and_levsketch_conversion():
    S, d, eps = 3, 5, 0.2
    K = _heavy(S, 200, d, 6)
    a = DecodeEngine(S, d, eps, dtype="float32", value_dim=2)
    V = np.random.default_rng(0).standard_normal((S, 200, 2))
    a.update(K[:, :50], values=V[:, :50])
    for i in range(50, 100):
        a.update(K[:, i], values=V[:, i])
    for clone in (DecodeEngine.from_bytes(a.to_bytes()), pickle.loads(pickle.dumps(a)), copy.deepcopy(a),
                  copy.copy(a), DecodeEngine.from_sketches(a.to_sketches(), dtype="float32")):
        assert clone == a and clone is not a
        for s in range(S):
            np.testing.assert_array_equal(clone.universal_set(head=s), a.universal_set(head=s))
    b = DecodeEngine(S, d, eps, dtype="float32", value_dim=2)
    b.update(K[:, 100:], values=V[:, 100:], ids=np.arange(100, 200))
    a.merge(b)
    Kst = _stored(K, "float32")
    for s in range(S):
        np.testing.assert_array_equal(a.universal_set(head=s), ref.universal_set(Kst[s], eps))
    with pytest.raises(ValueError, match="sketch 0"):
        a.merge(b)  # the same ids again
    with pytest.raises(ValueError, match="incompatible"):
        a.merge(DecodeEngine(S, d, eps, dtype="float16", value_dim=2))
    with pytest.raises(ValueError, match="float16 cannot store"):
        DecodeEngine.from_sketches([sl.LevSketch(d, eps).update(K[0, :20])], dtype="float16")
    with pytest.raises(ValueError):
        DecodeEngine.from_bytes(a.to_bytes()[:-5])


def test_long_stream_short():
    _long_stream(2, 8, 0.05, 5000)


@pytest.mark.slow
def test_long_stream_100k_tokens():
    _long_stream(3, 16, 0.02, 100_000)


def _long_stream(S, d, eps, n):
    rng = np.random.default_rng(7)
    K = (rng.standard_normal((S, n, d)) * rng.lognormal(0.0, 1.0, (S, n, 1))).astype(np.float32)
    eng = DecodeEngine(S, d, eps, dtype="float32")
    eng.update(K[:, : 4 * d])
    for i in range(4 * d, n):
        eng.update(K[:, i])
    for s in range(S):
        np.testing.assert_array_equal(eng.universal_set(head=s), sl.universal_set(K[s].astype(np.float64), eps))
        _, tau = eng.scores(head=s)
        assert np.all(tau >= eps)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_untouched_coordinates_take_the_compiled_step_and_stay_exact(dtype, monkeypatch):
    # real Gemma 3 keys have coordinates that are exactly zero in every key; a key that later touches one
    # (sketch 1, token 250; sketch 2 inside a 3-key block) must go the general way and stay exact
    S, d, eps, n = 3, 12, 0.12, 420
    K = _heavy(S, n, d, 5)
    K[:, :, [2, 7, 9]] = 0.0
    K[1, 250, 7] = 1.5
    K[2, 301, 2] = -0.75
    eng = DecodeEngine(S, d, eps, dtype=dtype)
    sks = [sl.LevSketch(d, eps) for _ in range(S)]
    Kst = _stored(K, dtype)
    general = []
    orig = DecodeEngine._general
    monkeypatch.setattr(DecodeEngine, "_general", lambda self, s, *a: general.append(s) or orig(self, s, *a))
    pos = 0
    for m in [40] + [1] * 240 + [3] * 20 + [1] * 80:
        eng.update(K[:, pos : pos + m])
        for s in range(S):
            sks[s].update(Kst[s, pos : pos + m])
        pos += m
        diag = eng._st.R[:, eng._st.diagonal_slots([2, 7, 9])]
        assert not diag[eng._st.dead[:, [2, 7, 9]]].any()  # no stand-in left behind
    for s in range(S):
        np.testing.assert_array_equal(eng.universal_set(head=s), sks[s].universal_set())
        assert_matches_reference(_Slot(eng, s), Kst[s, :pos], eps_list=[eps])
    assert len(general) < 30  # the prefill and the two touching keys, not every token (1,023 before)
    assert eng.to_bytes() == DecodeEngine.from_bytes(eng.to_bytes()).to_bytes()


@pytest.mark.parametrize("d", [1, 5, 8, 17, 64])
def test_packed_factor_kernels_equal_the_full_layout_bit_for_bit(d):
    from streamlev._kernels.batched_decode import back_solve, forward_score
    from streamlev._kernels.rank_one import fold_key

    rng = np.random.default_rng(d)
    R = np.linalg.qr(rng.standard_normal((3 * d, d)) * np.logspace(-3, 3, d), mode="r")
    R *= np.sign(np.diag(R))[:, None]
    P = R[np.triu_indices(d)].copy()
    x = rng.standard_normal(d)
    outs = []
    for F in (R.copy(), P.copy()):
        w, v, u, y = np.empty(d), np.empty(d), np.empty(d), np.empty(d)
        rho = fold_key(F, x, w, v, 1e-300, 1e300)
        back_solve(F, v.copy(), u)
        k = x.copy()
        outs.append((F, rho, v.copy(), u.copy(), forward_score(F, k, y)))
    (Rf, *full), (Pf, *packed) = outs
    assert np.array_equal(Rf[np.triu_indices(d)], Pf) and not np.tril(Rf, -1).any()
    for a, b in zip(full, packed):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(Rf.T @ Rf, R.T @ R + np.outer(x, x), rtol=1e-12, atol=1e-12 * np.abs(R).max() ** 2)


def test_engine_factor_is_packed_and_round_trips_through_levsketch():
    rng = np.random.default_rng(4)
    K = rng.standard_normal((3, 300, 16))
    eng = DecodeEngine(3, 16, 0.1, dtype="float64").update(K[:, :100])
    for i in range(100, 300):
        eng.update(K[:, i])
    assert eng._st.R.shape == (3, 16 * 17 // 2)
    for s in range(3):
        sk = sl.LevSketch(16, 0.1).update(K[s])
        R = eng._st.factor(s)
        G = K[s].T @ K[s]
        np.testing.assert_allclose(R.T @ R, G, rtol=0, atol=1e-12 * np.abs(G).max())
        np.testing.assert_array_equal(eng.universal_set(head=s), sk.universal_set())


@pytest.mark.parametrize("d,eps", [(16, 0.3), (32, 0.13)])  # eps >= 4 / (d - 1): the bound below always holds
def test_memory_in_use_is_at_most_fp16_keys_values_and_a_full_factor(d, eps):
    """Per sketch, in use: packed factor + (key, value, id, score) per retained key <= fp16 K, V + 8 d^2 bytes."""
    S, n = 4, 600
    rng = np.random.default_rng(d)
    K = (rng.standard_normal((S, n, d)) * rng.lognormal(0.0, 1.0, (S, n, 1))).astype(np.float16)
    V = rng.standard_normal((S, n, d)).astype(np.float16)
    eng = DecodeEngine(S, d, eps, dtype="float16", value_dim=d).update(K[:, :200], values=V[:, :200])
    for i in range(200, n):
        eng.update(K[:, i], values=V[:, i])
    st = eng._st
    per_key = st.KT.dtype.itemsize * d + st.V.dtype.itemsize * d + st.ids.itemsize + st.tau.itemsize
    for s in range(S):
        r = int(eng.num_retained[s])
        in_use = st.R[s].nbytes + r * per_key
        assert r <= d / eps and in_use <= r * 2 * (d + d) + 8 * d * d
