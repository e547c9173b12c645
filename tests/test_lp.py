"""LpSketch (general p): the streaming set always contains {j : alpha_j >= eps} (exact oracle)."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamlev as sl
from streamlev.lewis import lewis_weights
from streamlev.sensitivity import sensitivities
from streamlev.testing import key_matrices, make_keys, random_partition

PS = [0.5, 1.0, 1.5, 3.0, 4.0, 6.0]
SMALL_KINDS = ("gaussian", "heavy_tailed", "low_rank", "duplicates", "zero_rows", "spikes", "column_scaled")


def _eps_for(p):
    return 0.15 if p <= 2 else 0.4


def _true_set(K, p, eps):
    a = sensitivities(K, p)
    return set(np.flatnonzero(a >= eps * (1 + 1e-7)).tolist())


@pytest.mark.parametrize("p", PS)
@settings(max_examples=8)
@given(K=key_matrices(min_n=2, max_n=30, max_d=3, kinds=SMALL_KINDS), seed=st.integers(0, 2**31))
def test_streaming_and_merging_contain_the_true_universal_set(p, K, seed):
    eps = _eps_for(p)
    n, d = K.shape
    true = _true_set(K, p, eps)
    sk = sl.LpSketch(d, eps, p=p)
    for a, b in random_partition(n, seed):
        sk.update(K[a:b])
        assert sk.num_retained <= sl.LpSketch.max_retained(d, eps, p)
    assert true <= set(sk.universal_set().tolist())
    rng = np.random.default_rng(seed)
    parts = [sl.LpSketch(d, eps, p=p).update(K[a:b], ids=np.arange(a, b))
             for a, b in random_partition(n, seed + 1)]
    while len(parts) > 1:
        i, j = sorted(rng.choice(len(parts), size=2, replace=False))
        other = parts.pop(j)
        before = other.to_bytes()
        parts[i].merge(other)
        assert other.to_bytes() == before
        assert parts[i].num_retained <= sl.LpSketch.max_retained(d, eps, p)
    assert parts[0].n == n
    assert true <= set(parts[0].universal_set().tolist())


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_single_key_updates_contain_the_true_set(p):
    K = make_keys("heavy_tailed", 40, 3, 5)
    eps = _eps_for(p)
    sk = sl.LpSketch(3, eps, p=p)
    for row in K:
        sk.update(row)
    assert _true_set(K, p, eps) <= set(sk.universal_set().tolist())


@pytest.mark.parametrize("p", [3.0, 6.0])
def test_lewis_weight_increase_does_not_lose_heavy_keys(p):
    # Regression (found by a seeded search): adding one row raises an existing Lewis weight for p > 2
    # (x1.28 at p=3, x2.9 at p=6). Pruning must rely on sensitivities, which never increase.
    rng = np.random.default_rng(7)
    K = rng.standard_normal((8, 3))
    x = rng.standard_normal((1, 3)) * 2
    w0 = lewis_weights(K, p)
    w1 = lewis_weights(np.vstack([K, x]), p)[:8]
    assert np.max(w1 / w0) > 1.2
    full = np.vstack([K, x])
    a0, a1 = sensitivities(K, p), sensitivities(full, p)[:8]
    assert np.all(a1 <= a0 * (1 + 1e-6))  # sensitivities are monotone even here
    for eps in (0.2, 0.4, 0.6):
        sk = sl.LpSketch(3, eps, p=p).update(K).update(x)
        assert _true_set(full, p, eps) <= set(sk.universal_set().tolist())


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5])
def test_p_le_2_also_respects_the_leverage_bound(p):
    K = make_keys("heavy_tailed", 300, 4, 2)
    eps = 0.2
    U = sl.LpSketch(4, eps, p=p).update(K).universal_set()
    tau = sl.leverage_scores(K)
    assert np.all(tau[U] ** (p / 2) >= eps * (1 - 1e-9))


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_bounds_never_increase_and_round_trip(p):
    K = make_keys("heavy_tailed", 200, 3, 3)
    sk = sl.LpSketch(3, _eps_for(p), p=p)
    prev = {}
    for s in range(0, 200, 25):
        sk.update(K[s : s + 25])
        ids, ub = sk.scores()
        for i, u in zip(ids.tolist(), ub.tolist()):
            assert u <= prev.get(i, 1.0) + 1e-12
        prev = dict(zip(ids.tolist(), ub.tolist()))
    b = sk.to_bytes()
    sk2 = sl.LpSketch.from_bytes(b)
    assert sk2.to_bytes() == b
    assert pickle.loads(pickle.dumps(sk)).to_bytes() == b
    for a, c in zip(sk.scores(), sk2.scores()):
        np.testing.assert_array_equal(a, c)


def test_offline_universal_set_for_other_p_contains_true_set():
    K = make_keys("heavy_tailed", 30, 3, 9)
    for p in (1.0, 3.0):
        eps = _eps_for(p)
        U = set(sl.universal_set(K, eps, p=p).tolist())
        assert _true_set(K, p, eps) <= U
        assert len(U) <= 3 ** max(1, p / 2) / eps


def test_bad_input_leaves_lp_sketch_unchanged():
    sk = sl.LpSketch(3, 0.2, p=1.0).update(make_keys("gaussian", 50, 3, 0))
    before = sk.to_bytes()
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    for args, exc in [((bad,), ValueError), ((np.ones((2, 4)),), ValueError), ((np.ones((2, 3)), [1, 1]), ValueError),
                      ((np.ones((2, 3), dtype=complex),), TypeError)]:
        with pytest.raises(exc):
            sk.update(*args)
        assert sk.to_bytes() == before
    for other in (sl.LpSketch(3, 0.2, p=1.5), sl.LpSketch(3, 0.3, p=1.0), sl.LpSketch(4, 0.2, p=1.0)):
        other.update(np.eye(other.d), ids=np.arange(100, 100 + other.d))
        with pytest.raises(ValueError, match="incompatible"):
            sk.merge(other)
    with pytest.raises(TypeError):
        sk.merge(sl.LevSketch(3, 0.2))
    with pytest.raises(ValueError):
        sl.LpSketch.from_bytes(before[:-3])
    with pytest.raises(ValueError, match="LevSketch"):
        sl.LpSketch.from_bytes(sl.LevSketch(3, 0.2).to_bytes())
    assert sk.to_bytes() == before
