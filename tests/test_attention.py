"""Heavy entries from a sketch equal brute force; LevAttention and its restriction cost equal direct computations."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import streamlev as sl
from streamlev import reference as ref
from streamlev.attention import heavy_attention, lev_attention, restriction_cost, select_keys
from streamlev.datasets import load_minilm
from streamlev.testing import KINDS, key_matrices, make_keys, query_matrices, random_partition, score_tolerance

from ._compare import loop_attention

U = np.finfo(np.float64).eps


# ------------------------------------------------------------------ helpers
def _scaled(X):
    m = np.max(np.abs(X)) if X.size else 0.0
    return np.ldexp(X, -int(np.frexp(m)[1])) if m > 0 else X


def _entry_tolerance(Q, K):
    """Per-query accuracy of an x^2 attention share in float64: ~ u d ||q||^2 ||K||_F^2 / ||K q||^2 (+ ridge)."""
    Qs, Ks = _scaled(Q), _scaled(K)
    kq = np.sum((Qs @ Ks.T) ** 2, axis=1)
    num = np.sum(Qs**2, axis=1) * np.sum(Ks**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(kq > 0, 1e3 * U * K.shape[1] * num / kq, np.inf)
    return np.maximum(rel, 1e-10)


def assert_heavy_equals_brute_force(A, Q, K, eps, ids=None):
    """CSR A (columns = key ids) holds exactly the entries >= eps of the brute-force attention, away from ties."""
    B = ref.attention_x2(Q, K)
    ids = np.arange(K.shape[0]) if ids is None else np.asarray(ids)
    got = np.zeros_like(B)
    C = A.tocoo()
    where = {int(k): j for j, k in enumerate(ids)}
    assert all(int(c) in where for c in C.col)  # entries only in columns of real key ids
    got[C.row, [where[int(c)] for c in C.col]] = C.data
    tol = _entry_tolerance(Q, K)[:, None]
    clear = np.abs(B - eps) > tol * np.maximum(1.0, 1.0 / eps) * eps + 10 * score_tolerance(K) * (tol > 1e-6)
    np.testing.assert_array_equal((got > 0)[clear], (B >= eps)[clear])
    both = (got > 0) & (B >= eps)
    np.testing.assert_allclose(got[both], B[both], rtol=1e-6 + float(np.max(np.where(both, tol, 0), initial=0)))


EPS = st.sampled_from([0.05, 0.1, 0.3, 0.5])


# ------------------------------------------------------------- heavy entries
@given(K=key_matrices(max_n=50), eps=EPS, seed=st.integers(0, 2**31), data=st.data())
def test_heavy_attention_equals_brute_force_on_adversarial_keys(K, eps, seed, data):
    d = K.shape[1]
    Q = data.draw(query_matrices(d))
    sk = sl.LevSketch(d, eps)
    for a, b in random_partition(K.shape[0], seed):
        sk.update(K[a:b])
    A = sk.heavy_attention(Q)
    assert sp.isspmatrix_csr(A) and A.shape == (Q.shape[0], K.shape[0])
    assert_heavy_equals_brute_force(A, Q, K, eps)


@pytest.mark.parametrize("kind", KINDS)
def test_worst_case_queries_find_exactly_the_keys_at_or_above_eps(kind):
    # query j is the maximiser for key j: its share is tau_j, so (j, j) is heavy iff tau_j >= eps
    K = make_keys(kind, 120, 5, seed=3)
    eps = 0.05
    Q = np.vstack([ref.worst_case_queries(K), np.random.default_rng(0).standard_normal((30, 5))])
    A = sl.LevSketch(5, eps).update(K).heavy_attention(Q)
    assert_heavy_equals_brute_force(A, Q, K, eps)


@pytest.mark.parametrize("layer,head", [(0, 0), (2, 5), (5, 11)])
def test_heavy_attention_on_real_minilm_keys(layer, head):
    s = load_minilm()
    Q, K = s.q[layer, head], s.k[layer, head]
    for eps in (0.02, 0.05, 0.2):
        sk = sl.LevSketch(K.shape[1], eps)
        for blk in np.array_split(K, 5):
            sk.update(blk)
        A = sk.heavy_attention(Q)
        B = ref.attention_x2(Q, K)
        clear = np.abs(B - eps) > 1e-9
        np.testing.assert_array_equal((A.toarray() > 0)[clear], (B >= eps)[clear])
        np.testing.assert_allclose(A.toarray()[A.toarray() > 0], B[A.toarray() > 0], rtol=1e-9)


def test_heavy_attention_larger_eps_ids_and_id_map():
    rng = np.random.default_rng(1)
    K = rng.standard_normal((400, 6)) * np.exp(1.5 * rng.standard_normal((400, 1)))
    Q = rng.standard_normal((50, 6))
    ids = np.arange(400) * 3 + 7
    sk = sl.LevSketch(6, 0.02).update(K, ids=ids)
    for eps in (0.02, 0.1, 0.5):
        A = heavy_attention(sk, Q, eps)
        assert A.shape == (50, max(400, int(sk.retained()[0][-1]) + 1))
        assert_heavy_equals_brute_force(A, Q, K, eps, ids=ids)
        M, cols = heavy_attention(sk, Q, eps, id_map=True)
        np.testing.assert_array_equal(cols, sk.retained()[0])
        assert M.shape == (50, cols.size)
        np.testing.assert_array_equal(M.toarray(), A.toarray()[:, cols])
    with pytest.raises(ValueError, match="below the sketch's eps"):
        sk.heavy_attention(Q, 0.01)
    with pytest.raises(ValueError, match="columns"):
        sk.heavy_attention(Q[:, :5])
    neg = sl.LevSketch(6, 0.1).update(K[:20], ids=-np.arange(1, 21))
    with pytest.raises(ValueError, match="id_map=True"):
        neg.heavy_attention(Q)
    M, cols = heavy_attention(neg, Q, id_map=True)
    assert np.all(cols < 0) and M.shape[1] == cols.size


def test_heavy_attention_empty_sketch_and_scale_extremes():
    Q = np.ones((3, 4))
    A = sl.LevSketch(4, 0.1).heavy_attention(Q)
    assert A.shape == (3, 0) and A.nnz == 0
    rng = np.random.default_rng(2)
    K = rng.standard_normal((60, 4))
    for s in (1e-150, 1e150):
        A = sl.LevSketch(4, 0.1).update(K * s).heavy_attention(Q * (1 / s))
        assert_heavy_equals_brute_force(A, Q, K, 0.1)


def test_heavy_attention_rejects_general_p_sketches():
    class FakeLp:
        p = 3.0
        d = 4
        eps = 0.1

    with pytest.raises(NotImplementedError, match="p=3.0"):
        heavy_attention(FakeLp(), np.ones((2, 4)))
    with pytest.raises(TypeError):
        heavy_attention(object(), np.ones((2, 4)))


# ------------------------------------------------------------ attention layers
def _qkv(seed, n=40, nq=None, d=4, dv=3):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((n, d)) * np.exp(rng.standard_normal((n, 1)))
    return rng.standard_normal((nq or n, d)), K, rng.standard_normal((n, dv))


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, "softmax"])
@pytest.mark.parametrize("causal", [False, True])
def test_lev_attention_with_every_key_kept_is_full_attention(p, causal):
    Q, K, V = _qkv(0)
    scale = 1 / np.sqrt(4) if p == "softmax" else None
    want = loop_attention(Q, K, V, p, scale, causal)
    np.testing.assert_allclose(lev_attention(Q, K, V, budget=K.shape[0], p=p, causal=causal), want,
                               rtol=1e-12, atol=1e-12)
    if p in (2.0, "softmax"):
        np.testing.assert_allclose(lev_attention(Q, K, V, eps=1e-9, p=p, causal=causal), want, rtol=1e-12,
                                   atol=1e-12)
    if p == "softmax":
        np.testing.assert_allclose(lev_attention(Q, K, V, budget=K.shape[0], p=p, scale=0.3, causal=causal),
                                   loop_attention(Q, K, V, p, 0.3, causal), rtol=1e-12, atol=1e-12)


def _prefix_reference_sets(K, eps=None, budget=None):
    """Per position i: reference prefix leverage, and whether the kept set is unambiguous (no near-tie)."""
    sets, clear = [], []
    for i in range(K.shape[0]):
        tau = ref.leverage_scores(K[: i + 1])
        tol = max(1e-9, score_tolerance(K[: i + 1]))
        if eps is not None:
            sets.append(np.flatnonzero(tau >= eps))
            clear.append(np.all(np.abs(tau - eps) > tol))
        else:
            order = np.lexsort((np.arange(i + 1), -tau))
            sets.append(np.sort(order[:budget]))
            srt = np.sort(tau)[::-1]
            clear.append(i + 1 <= budget or srt[budget - 1] - srt[budget] > tol)
    return sets, np.array(clear)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", [{"eps": 0.2}, {"eps": 0.5}, {"budget": 3}, {"budget": 7}])
@pytest.mark.parametrize("p", [2.0, "softmax"])
def test_causal_lev_attention_equals_per_query_loop_over_prefix_leverage(seed, mode, p):
    Q, K, V = _qkv(seed, n=45, d=4)
    sets, clear = _prefix_reference_sets(K, **mode)
    C = select_keys(K, causal=True, **mode)
    assert sp.isspmatrix_csr(C) and C.shape == (45, 45)
    for i in range(45):
        row = C.indices[C.indptr[i] : C.indptr[i + 1]]
        assert np.all(row <= i)  # never a future key
        if "budget" in mode:
            assert row.size == min(mode["budget"], i + 1)
        if clear[i]:
            np.testing.assert_array_equal(np.sort(row), sets[i])
    assert clear[K.shape[1]:].mean() > 0.5  # the comparison is not vacuous
    scale = 0.5 if p == "softmax" else None
    got = lev_attention(Q, K, V, p=p, causal=True, **mode)
    want = loop_attention(Q, K, V, p, scale, causal=True, kept_rows=sets)
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-10, atol=1e-12)


@given(K=key_matrices(min_n=2, max_n=30, max_d=5), eps=EPS)
@settings(max_examples=15)
def test_select_keys_threshold_is_the_universal_set_and_budget_the_top(K, eps):
    U = select_keys(K, eps=eps)
    np.testing.assert_array_equal(U, sl.LevSketch(K.shape[1], eps).update(K).universal_set())
    tau = ref.leverage_scores(K)
    b = max(1, K.shape[0] // 3)
    top = select_keys(K, budget=b)
    rest = np.setdiff1d(np.arange(K.shape[0]), top)
    assert top.size == b
    if rest.size:
        assert tau[top].min() >= tau[rest].max() - score_tolerance(K)


def test_threshold_mode_keeps_every_heavy_entry_for_x2():
    Q, K, V = _qkv(5, n=300, nq=200, d=6)
    eps = 0.05
    kept = select_keys(K, eps=eps)
    A = ref.attention_x2(Q, K)
    assert set(np.flatnonzero((A >= eps).any(axis=0))) <= set(kept.tolist())
    cost = restriction_cost(Q, K, V, kept)
    # every left-out key has share < eps; the mass left out is bounded by their count times eps
    assert np.all(cost.mass_outside < eps * (K.shape[0] - kept.size) + 1e-12)


@pytest.mark.parametrize("p", [2.0, "softmax"])
@pytest.mark.parametrize("causal", [False, True])
def test_restriction_cost_equals_direct_computation(p, causal):
    Q, K, V = _qkv(7, n=50, d=4)
    scale = 1 / 2 if p == "softmax" else None
    kept = select_keys(K, budget=6, causal=causal)
    rows = [kept] * 50 if not causal else [kept.indices[kept.indptr[i] : kept.indptr[i + 1]] for i in range(50)]
    cost = restriction_cost(Q, K, V, kept, p=p, causal=causal)
    full = loop_attention(Q, K, V, p, scale, causal)
    restricted = loop_attention(Q, K, V, p, scale, causal, kept_rows=rows)
    np.testing.assert_allclose(lev_attention(Q, K, V, budget=6, p=p, causal=causal), restricted, atol=1e-12)
    np.testing.assert_allclose(cost.max_abs_error, np.abs(full - restricted).max(axis=1), atol=1e-12)
    mass = np.zeros(50)
    for i in range(50):
        cols = np.arange(i + 1 if causal else 50)
        s = K[cols] @ Q[i]
        w = np.exp(scale * s - np.max(scale * s)) if p == "softmax" else s**2
        a = w / w.sum()
        mass[i] = a[~np.isin(cols, rows[i])].sum()
    np.testing.assert_allclose(cost.mass_outside, mass, rtol=1e-10, atol=1e-15)
    # the same kept set as a dense mask gives the same answer
    mask = np.zeros((50, 50), dtype=bool)
    for i in range(50):
        mask[i, rows[i]] = True
    again = restriction_cost(Q, K, V, mask, p=p, causal=causal)
    np.testing.assert_allclose(again.max_abs_error, cost.max_abs_error, atol=1e-15)
    all_kept = restriction_cost(Q, K, V, np.arange(50), p=p, causal=causal)
    assert np.all(all_kept.mass_outside == 0) and np.all(all_kept.max_abs_error < 1e-12)


def test_softmax_has_no_universal_set():
    # the documented construction: q = t * k_j makes even the lowest-leverage key heavy under softmax
    rng = np.random.default_rng(3)
    K = rng.standard_normal((200, 4))
    K /= np.linalg.norm(K, axis=1, keepdims=True)
    j = int(np.argmin(ref.leverage_scores(K)))
    q = 200.0 * K[j]
    s = K @ q
    share = np.exp(s - s.max())[j] / np.exp(s - s.max()).sum()
    assert share > 0.5 and j not in select_keys(K, eps=0.05)


def test_leading_dimensions_and_torch_round_trip():
    rng = np.random.default_rng(4)
    Q, K, V = (rng.standard_normal((2, 3, 20, 4)) for _ in range(3))
    out = lev_attention(Q, K, V, budget=5, p="softmax", causal=True)
    for b in range(2):
        for h in range(3):
            np.testing.assert_allclose(out[b, h], lev_attention(Q[b, h], K[b, h], V[b, h], budget=5, p="softmax",
                                                                causal=True), atol=1e-15)
    torch = pytest.importorskip("torch")
    for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 3e-2)):
        Qt, Kt, Vt = (torch.from_numpy(x.copy()).to(dt) for x in (Q, K, V))
        got = lev_attention(Qt, Kt, Vt, eps=0.1, p=2)
        assert isinstance(got, torch.Tensor) and got.dtype == dt
        plain = [(x.float() if dt == torch.bfloat16 else x).numpy() for x in (Qt, Kt, Vt)]
        want = lev_attention(*plain, eps=0.1, p=2)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)


def test_validation_messages():
    Q, K, V = _qkv(0, n=10)
    with pytest.raises(ValueError, match="exactly one of eps"):
        lev_attention(Q, K, V)
    with pytest.raises(ValueError, match="exactly one of eps"):
        lev_attention(Q, K, V, eps=0.1, budget=3)
    with pytest.raises(ValueError, match="budget"):
        lev_attention(Q, K, V, budget=0)
    with pytest.raises(ValueError, match="softmax only"):
        lev_attention(Q, K, V, eps=0.1, scale=2.0)
    with pytest.raises(NotImplementedError, match="threshold mode"):
        lev_attention(Q, K, V, eps=0.1, p=3)
    with pytest.raises(ValueError, match="n_q == n"):
        lev_attention(Q[:5], K, V, eps=0.1, causal=True)
    with pytest.raises(ValueError, match="one value per key"):
        lev_attention(Q, K, V[:5], eps=0.1)
    with pytest.raises(ValueError, match="p must be"):
        restriction_cost(Q, K, V, np.arange(3), p="relu")
    with pytest.raises(ValueError, match=r"shape \(n_q, n\)"):
        restriction_cost(Q, K, V, np.ones((3, 3), bool))
