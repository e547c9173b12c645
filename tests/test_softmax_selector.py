"""SoftmaxSelector and select_softmax: budgets, windows, sinks, streaming semantics, bytes, bad input."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlev.selectors import select_softmax
from streamlev.softmax_scores import observed_attention, rope_shift
from streamlev.softmax_selector import QUERY_HALF_LIFE, RULES, SoftmaxSelector, default_selector


def _data(n=60, d=6, g=3, seed=0):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, (n, 1))
    Q = rng.standard_normal((g, n, d)) + rng.standard_normal(d)
    return K, Q


def _rotate(q, delta, theta):
    """Rotate-half RoPE by delta positions, one pair at a time."""
    d = q.size
    out = q.copy()
    for i in range(d // 2):
        a = delta * theta ** (-2.0 * i / d)
        out[i] = q[i] * np.cos(a) - q[i + d // 2] * np.sin(a)
        out[i + d // 2] = q[i + d // 2] * np.cos(a) + q[i] * np.sin(a)
    return out


def _reference_observed(K, Q, causal, window, half_life=None, theta=None, buffer=512):
    """Mean softmax weight per key of the newest observed queries, moved to position n: plain loops."""
    g, m, d = Q.shape
    n = K.shape[0]
    qpos = np.arange(n - m, n)[-buffer:]
    Q = Q[:, -buffer:]
    vis = [j for j in range(n) if not causal or window is None or j > n - window]
    s, wsum = np.zeros(n), 0.0
    for i, t in enumerate(qpos):
        w = 1.0 if half_life is None else 2.0 ** (-(qpos[-1] - t) / half_life)
        wsum += w
        for h in range(g):
            q = _rotate(Q[h, i], n - t, theta) if (causal and theta) else Q[h, i]
            lg = np.array([q @ K[j] / np.sqrt(d) for j in vis])
            p = np.exp(lg - lg.max())
            p /= p.sum()
            for j, pj in zip(vis, p):
                s[j] += w * pj
    return s / (g * wsum)


def _reference_select(scores, n, budget, sinks, recent, window):
    lo = 0 if window is None else max(0, n - window + 1)
    live = [j for j in range(lo, n)]
    forced = sorted({j for j in live if j < sinks or j >= n - recent})
    rest = [j for j in live if j not in forced]
    rest.sort(key=lambda j: (-scores[j], j))
    return np.array(sorted(forced + rest[: max(0, min(budget, len(live)) - len(forced))]), np.int64)


# ------------------------------------------------------------------ offline entry point == documented rule
@pytest.mark.parametrize("causal,window,theta", [(False, None, None), (True, None, None), (True, 17, 100.0),
                                                 (True, None, 10.0)])
def test_select_softmax_query_default_equals_reference(causal, window, theta):
    K, Q = _data()
    for budget in (1, 5, 12, 30):
        ref = _reference_observed(K, Q, causal, window, QUERY_HALF_LIFE if causal else None, theta)
        want = _reference_select(ref, len(K), budget, 0, 0, window)
        got = select_softmax(K, budget, queries=Q, causal=causal, window=window, rope_theta=theta)
        assert np.array_equal(got, want)


def test_query_buffer_keeps_the_newest_queries():
    K, Q = _data(n=40, seed=31)
    ref = _reference_observed(K, Q, True, None, 8.0, 50.0, buffer=7)
    sk = SoftmaxSelector(6, 40, rule="observed", causal=True, half_life=8.0, rope_theta=50.0, query_buffer=7)
    for a in range(0, 40, 3):
        sk.update(K[a:a + 3], Q[:, a:a + 3])
    ids, sc = sk.held_scores()  # budget >= n: nothing evicted, so the streamed scores are the offline ones
    assert np.array_equal(ids, np.arange(40)) and np.allclose(sc, ref, rtol=1e-10, atol=1e-15)


def _splitmix_priority(seed, ordinal):
    """The uniform sample's priority of one query ordinal, in plain Python integers (mod 2^64)."""
    m = (1 << 64) - 1
    z = ((ordinal + 1) * 0x9E3779B97F4A7C15 + seed) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _bottom_k(seed, n, k):
    return sorted(sorted(range(n), key=lambda i: (_splitmix_priority(seed, i), i))[:k])


@pytest.mark.parametrize("seed", [0, 7])
def test_uniform_query_buffer_is_the_bottom_k_sample_however_the_stream_is_cut(seed):
    rng = np.random.default_rng(seed)
    n, g, d, W = 90, 2, 5, 11
    K = rng.standard_normal((n, d))
    Q = rng.standard_normal((g, n, d))
    want = _bottom_k(seed, n, W)
    one = SoftmaxSelector(d, n, query_buffer=W, seed=seed).update(K, Q)
    cuts = np.sort(rng.choice(np.arange(1, n), 6, replace=False))
    parts = np.split(np.arange(n), cuts)
    streamed = SoftmaxSelector(d, n, query_buffer=W, seed=seed)
    for p in parts:  # keys and queries in blocks, queries also alone (m = 0 keys)
        streamed.update(K[p[:1]], Q[:, p[:1]]).update(np.zeros((0, d)), Q[:, p[1:]]).update(K[p[1:]])
    a = SoftmaxSelector(d, n, query_buffer=W, seed=seed)
    b = SoftmaxSelector(d, n, query_buffer=W, seed=seed, offset=40, query_offset=40)
    a.update(K[:40], Q[:, :40]).merge(b.update(K[40:], Q[:, 40:]))
    for sk in (one, streamed, a):
        assert sk.query_sample == "uniform" and sk._qb_pos.tolist() == want
        assert np.array_equal(sk._Qb, Q[:, want])
    ref = _reference_observed(K, Q[:, want], False, None, buffer=W)  # its score is the offline rule on the sample
    assert np.allclose(one.held_scores()[1], ref, rtol=1e-10, atol=1e-15)
    assert np.array_equal(one.kept(), streamed.kept()) and np.array_equal(one.kept(), a.kept())  # budget >= n


def test_uniform_query_buffer_covers_the_whole_input():
    # 4096 query positions, 512 kept: a uniform sample has about 128 in each quarter (newest would have 0, 0, 0, 512)
    d = 2
    sk = SoftmaxSelector(d, 4, seed=3).update(np.ones((1, d)), np.ones((4096, d)))
    counts = np.bincount(sk._qb_pos // 1024, minlength=4)
    assert sk._qb_pos.size == 512 and np.all(np.abs(counts - 128) < 40), counts
    newest = SoftmaxSelector(d, 4, query_sample="newest").update(np.ones((1, d)), np.ones((4096, d)))
    assert newest._qb_pos.tolist() == list(range(-511, 1))  # the last 512 of positions 1 - 4096 .. 0


def test_bytes_without_the_sample_fields_load_as_newest():
    from streamlev import _format

    K, Q = _data(n=12, d=3, g=1)
    sk = SoftmaxSelector(3, 4, query_sample="newest", query_buffer=5).update(K, Q)
    old = {  # the fields written before the uniform sample existed
        "d": 3, "budget": 4, "rule": RULES.index("observed"), "causal": 0, "window": 0, "sinks": 0, "recent": 0,
        "rope_theta": 0.0, "half_life": 0.0, "query_buffer": 5, "scale": sk.scale, "offset": 0, "n": 12, "nq": 12,
        "heads": 1, "ids": sk.kept(), "keys": sk.retained()[1], "queries": Q[0, -5:], "query_pos": np.arange(7, 12),
        "usum": sk._usum, "qsum": Q.sum(axis=(0, 1))}
    back = SoftmaxSelector.from_bytes(_format.dump("SoftmaxSelector", old))
    assert back.query_sample == "newest" and back.seed == 0 and back == sk
    assert back.update(K[:3], Q[:, :3]) == sk.update(K[:3], Q[:, :3])


def test_select_softmax_key_defaults_equal_reference():
    K, _ = _data(seed=3)
    n = len(K)
    nrm = np.linalg.norm(K, axis=1)
    U = K / nrm[:, None]
    a = U.sum(0)
    kd = -(K @ a) / (nrm * np.linalg.norm(a))
    for budget in (4, 9, 20):
        assert np.array_equal(select_softmax(K, budget), _reference_select(kd, n, budget, 0, 0, None))
        sinks, recent = min(4, budget // 4), int(0.5 * budget)
        assert np.array_equal(select_softmax(K, budget, causal=True),
                              _reference_select(-nrm, n, budget, sinks, recent, None))
        assert np.array_equal(select_softmax(K, budget, causal=True, window=15),
                              _reference_select(-nrm, n, budget, sinks, recent, 15))


def test_select_softmax_equals_single_block_streaming_and_accepts_2d_queries():
    K, Q = _data(seed=5)
    for q in (None, Q[0], Q):
        for causal, window in ((False, None), (True, None), (True, 9)):
            sk = default_selector(K.shape[1], 11, queries=q is not None, causal=causal, window=window)
            assert np.array_equal(select_softmax(K, 11, queries=q, causal=causal, window=window),
                                  sk.update(K, q).kept())


def test_gqa_pooling_is_the_mean_over_heads():
    K, Q = _data(seed=7)
    kw = dict(next_pos=len(K), causal=True, rope_theta=20.0, half_life=16.0)
    pooled = observed_attention(K, np.arange(len(K)), Q, np.arange(len(K)), **kw)
    per = [observed_attention(K, np.arange(len(K)), Q[h], np.arange(len(K)), **kw) for h in range(Q.shape[0])]
    assert np.allclose(pooled, np.mean(per, axis=0)) and np.isclose(pooled.sum(), 1.0)


def test_rope_shift_composes_with_rope():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((5, 8))
    assert np.allclose(rope_shift(rope_shift(q, np.full(5, 3), 100.0), np.full(5, 4), 100.0),
                       rope_shift(q, np.full(5, 7), 100.0))
    assert np.allclose([_rotate(x, 7, 100.0) for x in q], rope_shift(q, np.full(5, 7), 100.0))


# ------------------------------------------------------------------ streaming invariants
@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 10_000), budget=st.integers(1, 25), window=st.one_of(st.none(), st.integers(1, 40)),
       rule=st.sampled_from(RULES), blocks=st.lists(st.integers(0, 13), min_size=1, max_size=8),
       with_q=st.booleans())
def test_streaming_invariants(seed, budget, window, rule, blocks, with_q):
    n = sum(blocks)
    K, Q = _data(n=max(n, 1), d=4, g=2, seed=seed)
    sk = SoftmaxSelector(4, budget, rule=rule, causal=True, window=window, rope_theta=30.0,
                         half_life=8.0 if rule == "observed" else None, query_buffer=9)
    a = 0
    for m in blocks:
        held = sk.kept()
        ch = sk.update(K[a:a + m], Q[:, a:a + m] if with_q else None, return_changes=True)
        a += m
        kept = sk.kept()
        # changes replay the kept set
        assert np.array_equal(np.sort(np.union1d(np.setdiff1d(held, ch.evicted), ch.added)), kept)
        assert np.all((ch.added >= a - m) & (ch.added < a))
        assert kept.size <= min(budget, sk.max_retained()) and np.all(np.diff(kept) > 0)
        if window is not None:  # nothing a later query cannot see
            assert np.all(kept > a - window)
        live = np.arange(0 if window is None else max(0, a - window + 1), a)
        assert kept.size == min(budget, live.size)  # never idle below the budget
        forced = live[(live < sk.sinks) | (live >= a - sk.recent)]
        assert np.isin(forced, kept).all()
    assert sk.n == n


def test_static_rule_streaming_equals_offline_without_window():
    K, _ = _data(n=200, seed=11)
    off = SoftmaxSelector(6, 23, rule="small_norm", causal=True, recent_fraction=0.5).update(K).kept()
    sk = SoftmaxSelector(6, 23, rule="small_norm", causal=True, recent_fraction=0.5)
    for a in range(0, 200, 7):
        sk.update(K[a:a + 7])
    assert np.array_equal(sk.kept(), off)


def test_evicted_key_never_returns():
    K, Q = _data(n=120, seed=17)
    sk = SoftmaxSelector(6, 10, rule="observed", causal=True)
    gone = set()
    for a in range(0, 120, 5):
        ch = sk.update(K[a:a + 5], Q[:, a:a + 5], return_changes=True)
        assert not gone & set(ch.added.tolist())
        gone |= set(ch.evicted.tolist()) | (set(range(a, a + 5)) - set(ch.added.tolist()))
        assert not gone & set(sk.kept().tolist())


# ------------------------------------------------------------------ merge
def test_merge_of_segments_equals_one_stream_for_a_static_rule():
    K, _ = _data(n=90, seed=19)
    one = SoftmaxSelector(6, 12, rule="small_norm", causal=True).update(K)
    a = SoftmaxSelector(6, 12, rule="small_norm", causal=True).update(K[:40])
    b = SoftmaxSelector(6, 12, rule="small_norm", causal=True, offset=40).update(K[40:])
    b_bytes = b.to_bytes()
    a.merge(b)
    assert np.array_equal(a.kept(), one.kept()) and a.n == 90 and b.to_bytes() == b_bytes


def test_merge_observed_keeps_within_segment_statistics():
    K, Q = _data(n=80, seed=23)
    a = SoftmaxSelector(6, 10, rule="observed", causal=True).update(K[:50], Q[:, :50])
    b = SoftmaxSelector(6, 10, rule="observed", causal=True, offset=50).update(K[50:], Q[:, 50:])
    union = np.union1d(a.kept(), b.kept())
    ch = a.merge(b, return_changes=True)
    assert np.isin(a.kept(), union).all() and a.num_retained == 10 and a.n_queries == 3 * 80
    ids, _ = a.held_scores()
    assert np.array_equal(ids, a.kept())
    assert np.isin(ch.added, b.kept()).all()


def test_merge_appends_an_independent_stream_after_this_one():
    K, _ = _data(n=90, seed=19)
    one = SoftmaxSelector(6, 12, rule="small_norm", causal=True).update(K)
    a = SoftmaxSelector(6, 12, rule="small_norm", causal=True).update(K[:40])
    b = SoftmaxSelector(6, 12, rule="small_norm", causal=True).update(K[40:])  # its own positions 0..49
    ch = a.merge(b, return_changes=True)
    assert np.array_equal(a.kept(), one.kept()) and np.all(ch.added >= 40)  # b's ids moved after a's


def test_merge_rejects_mismatches():
    a = SoftmaxSelector(4, 5).update(np.ones((3, 4)))
    with pytest.raises(ValueError, match="parameters differ"):
        a.merge(SoftmaxSelector(4, 6, offset=3))
    with pytest.raises(ValueError, match="heads"):
        SoftmaxSelector(4, 5).update(np.ones((3, 4)), np.ones((2, 3, 4))).merge(
            SoftmaxSelector(4, 5).update(np.ones((3, 4)), np.ones((3, 3, 4))))
    with pytest.raises(TypeError):
        a.merge(object())
    with pytest.raises(ValueError, match="itself"):
        a.merge(a)


# ------------------------------------------------------------------ bytes, copies, equality
@pytest.mark.parametrize("rule", RULES)
def test_bytes_pickle_copy_round_trip(rule):
    K, Q = _data(n=40, seed=29)
    sk = SoftmaxSelector(6, 9, rule=rule, causal=True, window=25, rope_theta=99.0, query_buffer=12,
                         half_life=5.0 if rule == "observed" else None).update(K[:30], Q[:, :30])
    for clone in (SoftmaxSelector.from_bytes(sk.to_bytes()), pickle.loads(pickle.dumps(sk)), sk.copy(),
                  copy.deepcopy(sk), copy.copy(sk)):
        assert clone == sk and clone is not sk
        clone.update(K[30:], Q[:, 30:])
        assert clone != sk and clone.n == 40 and sk.n == 30
    assert SoftmaxSelector.from_bytes(sk.to_bytes()).update(K[30:], Q[:, 30:]) == sk.copy().update(K[30:], Q[:, 30:])
    assert SoftmaxSelector(3, 2).is_empty and not sk.is_empty and sk.nbytes > 0


def test_from_bytes_rejects_corruption():
    raw = bytearray(SoftmaxSelector(4, 3).update(np.eye(4)).to_bytes())
    raw[-9] ^= 0xFF
    with pytest.raises(ValueError):
        SoftmaxSelector.from_bytes(bytes(raw))
    with pytest.raises(TypeError):
        SoftmaxSelector.from_bytes("not bytes")


# ------------------------------------------------------------------ bad input leaves the state unchanged
@pytest.mark.parametrize("keys,queries,exc", [
    (np.full((2, 4), np.nan), None, ValueError),
    (np.ones((2, 4)), np.full((2, 4), np.inf), ValueError),
    (np.ones((2, 5)), None, ValueError),
    (np.ones((2, 4)), np.ones((2, 3)), ValueError),
    (np.ones((2, 4)), np.ones((1, 2, 2, 4)), ValueError),
    (np.array([["a"] * 4]), None, TypeError),
    (np.ones((2, 4)), np.ones((99, 4)), ValueError),  # more causal queries than positions
])
def test_bad_input_leaves_state_unchanged(keys, queries, exc):
    sk = SoftmaxSelector(4, 3, causal=True).update(np.arange(20.0).reshape(5, 4), np.ones((5, 4)))
    before = sk.to_bytes()
    with pytest.raises(exc):
        sk.update(keys, queries)
    assert sk.to_bytes() == before


@pytest.mark.parametrize("kw", [dict(budget=0), dict(rule="nope"), dict(window=5), dict(sinks=3, recent=3),
                                dict(half_life=4.0), dict(scale=-1.0), dict(recent_fraction=1.0),
                                dict(d=5, rope_theta=10.0), dict(query_buffer=0), dict(rope_theta=float("nan")),
                                dict(query_sample="oldest"), dict(causal=True, query_sample="uniform"),
                                dict(seed=-1)])
def test_bad_parameters(kw):
    args = dict(d=4, budget=5)
    args.update(kw)
    with pytest.raises(ValueError):
        SoftmaxSelector(args.pop("d"), args.pop("budget"), **args)
