"""Softmax key selectors: exact identities, streaming == offline, mergeable query statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlev import LevSketch
from streamlev.query_sketch import QuerySketch
from streamlev.reference import leverage_scores as ref_leverage
from streamlev.selectors import (ShiftInvariantSketch, budget_split, expected_logit_scores, keydiff_scores,
                                 query_span_basis, query_span_leverage, rope_rotations, select,
                                 shift_invariant_leverage)


def _keys(rng, n, d, shift=0.0):
    return rng.standard_normal((n, d)) * rng.lognormal(0, 0.7, (n, 1)) + shift


def _split(n, rng, parts):
    cuts = np.sort(rng.choice(np.arange(1, n), size=parts - 1, replace=False))
    return np.split(np.arange(n), cuts)


# ------------------------------------------------------------------ shift-invariant leverage
@settings(max_examples=25)
@given(n=st.integers(3, 120), d=st.integers(1, 6), seed=st.integers(0, 2**31), shift=st.floats(-50, 50),
       c=st.sampled_from([1.0, 0.3, 8.0]))
def test_augmented_leverage_identity_and_streaming(n, d, seed, shift, c):
    """Streaming (blocks, single keys, merge) == offline == 1/n + leverage of the centred keys."""
    # n <= d makes the centred keys exactly rank-deficient (rank n-1), where the reference's relative
    # ridge sees rounding-level singular values; the identity is checked in general position.
    n = max(n, d + 2)
    rng = np.random.default_rng(seed)
    K = _keys(rng, n, d, shift)
    Kc = K - K.mean(0)
    want = 1.0 / n + ref_leverage(Kc)
    offline = shift_invariant_leverage(K, c=c)
    scale = max(1.0, float(np.linalg.cond(np.hstack([Kc, np.ones((n, 1))]))))
    assert np.allclose(offline, want, atol=1e-9 * scale, rtol=1e-9 * scale)
    a = ShiftInvariantSketch(d, 1e-6, c=c)
    b = ShiftInvariantSketch(d, 1e-6, c=c)
    half = n // 2
    for blk in _split(half, rng, 2) if half >= 2 else [np.arange(half)]:
        a.update(K[blk], ids=blk)
    for j in range(half, n):
        b.update(K[j], ids=[j])
    a.merge(b)
    ids, tau = a.scores()
    assert a.n == n
    keep = ids  # every key with leverage >= 1e-6 (all but numerically null ones)
    assert np.allclose(tau, want[keep], atol=1e-9 * scale, rtol=1e-9 * scale)
    assert set(np.flatnonzero(want >= 1e-6 + 1e-9 * scale)) <= set(ids.tolist())


def test_scores_do_not_depend_on_c_or_on_a_shift(rng):
    K = _keys(rng, 300, 8)
    base = shift_invariant_leverage(K, c=1.0)
    for c in (0.01, 3.0, 100.0):
        assert np.allclose(shift_invariant_leverage(K, c=c), base, rtol=1e-8, atol=1e-12)
    v = rng.standard_normal(8) * 30
    assert np.allclose(shift_invariant_leverage(K + v), base, rtol=1e-7, atol=1e-10)
    # plain leverage is *not* shift-invariant (why the augmented score exists)
    assert not np.allclose(ref_leverage(K + v), ref_leverage(K), rtol=1e-3)


def test_augmented_leverage_never_increases_as_keys_arrive(rng):
    K = _keys(rng, 200, 5, shift=3.0)
    prev = None
    for m in range(20, 201, 20):
        tau = shift_invariant_leverage(K[:m])[:20]
        if prev is not None:
            assert np.all(tau <= prev + 1e-12)
        prev = tau


def test_threshold_set_and_top_budget_equal_offline(rng):
    K = _keys(rng, 500, 6, shift=-2.0)
    eps = 0.01
    sk = ShiftInvariantSketch(6, eps, c=2.0)
    for blk in np.array_split(K, 7):
        sk.update(blk)
    tau = shift_invariant_leverage(K)
    clear = np.abs(tau - eps) > 1e-9
    got = np.isin(np.arange(500), sk.universal_set())
    assert np.array_equal(got[clear], (tau >= eps)[clear])
    assert sk.num_retained <= ShiftInvariantSketch.max_retained(6, eps)
    for budget in (5, 20, sk.num_retained):
        want = np.sort(np.lexsort((np.arange(500), -tau))[:budget])
        assert np.array_equal(sk.top(budget), want)
    # documented approximation: with fewer retained keys than the budget, top returns them all
    assert np.array_equal(sk.top(sk.num_retained + 50), sk.universal_set())


def test_shift_invariant_sketch_bytes_merge_errors(rng):
    K = _keys(rng, 100, 4)
    a = ShiftInvariantSketch(4, 0.05, c=2.0).update(K[:60], values=K[:60, :2])
    b = ShiftInvariantSketch.from_bytes(a.to_bytes())
    assert b.to_bytes() == a.to_bytes() and b.c == 2.0 and b.n == 60
    ids, keys, vals = b.retained()
    assert np.allclose(keys, K[ids]) and np.allclose(vals, K[ids, :2])
    before = a.to_bytes()
    with pytest.raises(ValueError, match="constant coordinates differ"):
        a.merge(ShiftInvariantSketch(4, 0.05, c=1.0).update(K[60:], ids=np.arange(60, 100)))
    with pytest.raises(ValueError, match="columns"):
        a.update(np.ones((3, 5)))
    with pytest.raises(ValueError):
        ShiftInvariantSketch(4, 0.05, c=0.0)
    with pytest.raises(ValueError, match="checksum|truncated"):
        ShiftInvariantSketch.from_bytes(before[:-3] + b"abc")
    assert a.to_bytes() == before
    with pytest.raises(ValueError, match="2-D"):
        shift_invariant_leverage(np.ones(4))
    # LevSketch bytes are not ShiftInvariantSketch bytes
    with pytest.raises(ValueError, match="LevSketch"):
        ShiftInvariantSketch.from_bytes(LevSketch(4, 0.1).update(K).to_bytes())


# ------------------------------------------------------------------ query sketch
@settings(max_examples=25)
@given(n=st.integers(1, 80), d=st.integers(1, 6), parts=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_query_sketch_merge_is_exact(n, d, parts, seed):
    """Small-integer queries: every partial sum is exact, so any partition merges to identical statistics."""
    rng = np.random.default_rng(seed)
    Q = rng.integers(-20, 21, (n, d)).astype(float)
    parts = min(parts, n)
    sks = [QuerySketch(d).update(Q[blk]) for blk in (_split(n, rng, parts) if parts > 1 else [np.arange(n)])]
    whole = sks[0]
    for s in sks[1:]:
        whole.merge(QuerySketch.from_bytes(s.to_bytes()))
    assert whole.n == n
    assert np.array_equal(whole.sum, Q.sum(0))
    assert np.array_equal(whole.second_moment, Q.T @ Q)
    assert np.allclose(whole.mean, Q.mean(0))
    assert np.allclose(whole.covariance, np.cov(Q.T, bias=True).reshape(d, d), atol=1e-9)
    assert QuerySketch.from_bytes(whole.to_bytes()).to_bytes() == whole.to_bytes()


def test_query_sketch_errors_leave_state_unchanged(rng):
    qs = QuerySketch(3).update(rng.standard_normal((5, 3)))
    before = qs.to_bytes()
    with pytest.raises(ValueError, match="NaN"):
        qs.update(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="columns"):
        qs.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="dimensions differ"):
        qs.merge(QuerySketch(4))
    with pytest.raises(TypeError):
        qs.merge(LevSketch(3, 0.5))
    with pytest.raises(ValueError):
        QuerySketch.from_bytes(LevSketch(3, 0.5).to_bytes())
    assert qs.to_bytes() == before


# ------------------------------------------------------------------ query-statistics scores
def test_expected_logit_is_the_gaussian_mgf(rng):
    d = 4
    K = rng.standard_normal((30, d))
    Q = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) + 1.0
    qs = QuerySketch(d).update(Q)
    mu, C = Q.mean(0), np.cov(Q.T, bias=True)
    s = 0.25
    want = s * K @ mu + 0.5 * s * s * np.einsum("ij,jk,ik->i", K, C, K)
    assert np.allclose(expected_logit_scores(K, qs, scale=s), want)
    # Monte Carlo check of the MGF itself, on the fitted Gaussian
    G = rng.multivariate_normal(mu, C, size=100_000)
    mc = np.log(np.mean(np.exp(s * G @ K[:5].T), axis=0))
    assert np.allclose(mc, want[:5], atol=0.05)
    # a single repeated query: ranking == that query's softmax ranking
    q = rng.standard_normal(d)
    one = QuerySketch(d).update(np.tile(q, (10, 1)))
    e = expected_logit_scores(K, one)
    assert np.array_equal(np.argsort(-e, kind="stable"), np.argsort(-(K @ q), kind="stable"))


def test_expected_logit_over_rotated_positions(rng):
    d = 6
    K = rng.standard_normal((20, d))
    Q = rng.standard_normal((300, d)) + 0.5
    qs = QuerySketch(d).update(Q)
    R = rope_rotations(d, [3, 10, 11, 500], theta=100.0)
    assert np.allclose(np.einsum("tij,tkj->tik", R, R), np.eye(d))  # orthogonal
    mu, C, s = Q.mean(0), np.cov(Q.T, bias=True), 1 / np.sqrt(d)
    per_t = [s * K @ (Rt @ mu) + 0.5 * s * s * np.einsum("ij,jk,ik->i", K, Rt @ C @ Rt.T, K) for Rt in R]
    want = np.log(np.mean(np.exp(per_t), axis=0))
    assert np.allclose(expected_logit_scores(K, qs, rotations=R), want)
    assert np.allclose(expected_logit_scores(K, qs, rotations=np.eye(d)[None]), expected_logit_scores(K, qs))
    # position 0 is the identity; a rotation by t acts on pairs (i, i + d/2)
    assert np.allclose(rope_rotations(d, [0], 10.0)[0], np.eye(d))
    x = rng.standard_normal(d)
    ang = 7 * 10.0 ** (-np.arange(0, d, 2) / d)
    rot = np.concatenate([-x[d // 2:], x[: d // 2]])
    assert np.allclose(rope_rotations(d, [7], 10.0)[0] @ x, x * np.tile(np.cos(ang), 2) + rot * np.tile(np.sin(ang), 2))


@pytest.mark.parametrize("r", [1, 2, 4])
def test_query_span_leverage_is_the_x2_sensitivity_over_the_span(rng, r):
    n, d = 60, 6
    K = rng.standard_normal((n, d)) * rng.lognormal(0, 0.5, (n, 1))
    W = np.linalg.qr(rng.standard_normal((d, r)))[0]
    Q = rng.standard_normal((50, r)) @ W.T  # queries spanning exactly an r-dim subspace
    qs = QuerySketch(d).update(Q)
    B = query_span_basis(qs, energy=1.0)
    assert B.shape == (d, r)
    assert np.allclose(B @ B.T, W @ W.T, atol=1e-8)
    tau = query_span_leverage(K, qs, energy=1.0)
    assert np.allclose(tau, ref_leverage(K @ W), atol=1e-9)
    # the maximiser q* = B (B^T K^T K B)^{-1} B^T k_j attains tau_j; random queries in the span never exceed it
    G = B.T @ K.T @ K @ B
    for j in range(0, n, 7):
        a = np.linalg.solve(G, B.T @ K[j])
        q = B @ a
        assert np.isclose((q @ K[j]) ** 2 / np.sum((K @ q) ** 2), tau[j], rtol=1e-9)
        for _ in range(20):
            q = B @ rng.standard_normal(r)
            assert (q @ K[j]) ** 2 / np.sum((K @ q) ** 2) <= tau[j] * (1 + 1e-9)
    # full-rank queries: the span is everything and the score is plain leverage
    full = QuerySketch(d).update(rng.standard_normal((100, d)))
    assert np.allclose(query_span_leverage(K, full, energy=1.0), ref_leverage(K), atol=1e-9)


def test_query_scores_reject_bad_sketches(rng):
    K = rng.standard_normal((10, 3))
    with pytest.raises(ValueError, match="empty"):
        expected_logit_scores(K, QuerySketch(3))
    with pytest.raises(ValueError, match="d=4"):
        query_span_leverage(K, QuerySketch(4).update(np.ones((2, 4))))
    with pytest.raises(TypeError):
        expected_logit_scores(K, K)


# ------------------------------------------------------------------ budgets
@settings(max_examples=40)
@given(n=st.integers(0, 200), budget=st.integers(0, 250), causal=st.booleans(), seed=st.integers(0, 2**31))
def test_budget_split_and_select(n, budget, causal, seed):
    sinks, recent = budget_split(budget, n, causal=causal)
    b = min(budget, n)
    assert sinks + recent <= b
    if causal and b >= 16:
        assert sinks == 4 and recent == int(0.25 * b)
    if not causal:
        assert (sinks, recent) == (0, 0)
    s = np.random.default_rng(seed).standard_normal(n)
    idx = select(s, budget, sinks=sinks, recent=recent)
    assert idx.size == b and np.all(np.diff(idx) > 0)
    assert set(range(min(sinks, n))) <= set(idx.tolist())
    assert set(range(n - recent, n)) <= set(idx.tolist())
    rest = np.setdiff1d(idx, np.r_[np.arange(sinks), np.arange(n - recent, n)])
    others = np.setdiff1d(np.arange(sinks, n - recent), rest)
    if rest.size and others.size:
        assert s[rest].min() >= s[others].max()


def test_keydiff_prefers_distinct_keys():
    K = np.array([[1.0, 0.0]] * 9 + [[0.0, 1.0]])
    assert np.argmax(keydiff_scores(K)) == 9


def test_query_scores_from_merged_shards_equal_one_pass(rng):
    """The query-class scores depend on the queries only through the sketch, so shards merge to the same scores."""
    d = 8
    K, Q = rng.standard_normal((50, d)), rng.standard_normal((300, d)) * 2 + 1
    whole = QuerySketch(d).update(Q)
    parts = [QuerySketch(d).update(b) for b in np.array_split(Q, 5)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    R = rope_rotations(d, [10, 20], 1e4)
    for f in (lambda qs: expected_logit_scores(K, qs), lambda qs: expected_logit_scores(K, qs, rotations=R),
              lambda qs: query_span_leverage(K, qs, energy=1.0)):
        assert np.allclose(f(merged), f(whole), rtol=1e-10, atol=1e-12)
