"""LpEmbedding: merge-and-reduce Lewis-weight sampling approximates ||K q||_p^p for all q."""

import pickle

import numpy as np
import pytest

from streamlev.embedding import LpEmbedding, default_rows

# documented configuration: default rows, these (d, delta), fixed seeds; not tuned per seed
CONFIGS = [(1.0, 4, 0.2), (1.0, 6, 0.25), (3.0, 4, 0.2), (3.0, 6, 0.25)]


def _keys(n, d, seed):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((n, d)) * np.exp(rng.standard_normal((n, 1)))  # heavy-tailed row norms
    K[:5] *= 50.0  # a few huge keys
    K[5:20, -1] = 0.0
    K[20:, -1] = 0.0  # the last coordinate lives on 15 rows only: a rare direction
    K[5:20, -1] = rng.standard_normal(15)
    return K


def _queries(K, p, seed):
    rng = np.random.default_rng(seed + 1)
    d = K.shape[1]
    Vt = np.linalg.svd(K, full_matrices=False)[2]
    e_last = np.eye(d)[-1]
    # worst cases: singular directions, the rare direction, the huge keys, near-orthogonal to most keys
    return np.vstack([rng.standard_normal((400, d)), Vt, e_last, e_last + 1e-3 * rng.standard_normal(d),
                      K[:5], np.eye(d)])


def _exact(K, Q, p):
    return (np.abs(Q @ K.T) ** p).sum(axis=1)


@pytest.mark.parametrize("p, d, delta", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_relative_error_within_delta(p, d, delta, seed):
    n = 20000
    K = _keys(n, d, seed)
    emb = LpEmbedding(d, p, delta=delta, seed=seed)
    for a in range(0, n, 1500):
        emb.update(K[a : a + 1500])
    assert emb.n == n and emb.levels >= 3  # several sampled levels, not the exact regime
    Q = _queries(K, p, seed)
    rel = np.abs(emb.norm_p(Q) / _exact(K, Q, p) - 1.0)
    print(f"p={p} d={d} delta={delta} seed={seed} rows={emb.rows} levels={emb.levels} "
          f"num_rows={emb.num_rows} max_rel={rel.max():.4f}")
    assert rel.max() <= delta


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_exact_below_two_blocks(p):
    K = _keys(300, 3, 5)
    emb = LpEmbedding(3, p, delta=0.2, rows=200).update(K)
    Q = _queries(K, p, 5)
    np.testing.assert_allclose(emb.norm_p(Q), _exact(K, Q, p), rtol=1e-12)
    assert emb.num_rows == 300


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_merge_equals_one_process_bitwise(p):
    d, rows = 4, 100
    K = _keys(8 * rows + 37, d, 3)
    one = LpEmbedding(d, p, delta=0.3, seed=7, rows=rows)
    for b in range(0, K.shape[0], rows):
        one.update(K[b : b + rows])
    a = LpEmbedding(d, p, delta=0.3, seed=7, rows=rows).update(K[: 4 * rows])
    b = LpEmbedding(d, p, delta=0.3, seed=7, rows=rows).update(K[4 * rows : 6 * rows])
    c = LpEmbedding(d, p, delta=0.3, seed=7, rows=rows).update(K[6 * rows :])
    b_bytes, c_bytes = b.to_bytes(), c.to_bytes()
    a.merge(b).merge(c)
    assert b.to_bytes() == b_bytes and c.to_bytes() == c_bytes  # others not mutated
    assert a.to_bytes() == one.to_bytes()
    # and arbitrary update chunking gives the same tree
    other = LpEmbedding(d, p, delta=0.3, seed=7, rows=rows)
    for s in range(0, K.shape[0], 77):
        other.update(K[s : s + 77])
    assert other.to_bytes() == one.to_bytes()
    # a different seed gives a different sample
    assert LpEmbedding(d, p, delta=0.3, seed=8, rows=rows).update(K).to_bytes() != one.to_bytes()


def test_merge_rejects_incompatible_and_self():
    a = LpEmbedding(3, 1.0, seed=0)
    for other in (LpEmbedding(3, 1.0, seed=1), LpEmbedding(4, 1.0), LpEmbedding(3, 3.0),
                  LpEmbedding(3, 1.0, delta=0.2)):
        with pytest.raises(ValueError, match="incompatible"):
            a.merge(other)
    with pytest.raises(ValueError):
        a.merge(a)
    with pytest.raises(TypeError):
        a.merge(object())


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_bytes_round_trip(p):
    K = _keys(1234, 3, 2)
    emb = LpEmbedding(3, p, delta=0.3, seed=11, rows=100).update(K)
    data = emb.to_bytes()
    back = LpEmbedding.from_bytes(data)
    assert back.to_bytes() == data
    assert (back.seed, back.n, back.rows, back.num_rows) == (11, emb.n, 100, emb.num_rows)
    Q = _queries(K, p, 2)
    np.testing.assert_array_equal(back.norm_p(Q), emb.norm_p(Q))
    # continuing after the round trip equals continuing the original
    more = _keys(500, 3, 9)
    assert back.update(more).to_bytes() == emb.update(more).to_bytes()
    assert pickle.loads(pickle.dumps(back)).to_bytes() == back.to_bytes()
    with pytest.raises(ValueError):
        LpEmbedding.from_bytes(data[:-5])
    with pytest.raises(TypeError):
        LpEmbedding.from_bytes("not bytes")


def test_bad_input_leaves_state_unchanged():
    emb = LpEmbedding(3, 1.0, delta=0.3, rows=50).update(_keys(120, 3, 0))
    before = emb.to_bytes()
    bad = _keys(200, 3, 1)
    bad[150, 1] = np.nan
    for x in (bad, np.ones((4, 2)), np.ones((2, 2, 3)), "abc"):
        with pytest.raises((ValueError, TypeError)):
            emb.update(x)
        assert emb.to_bytes() == before
    with pytest.raises(ValueError):
        emb.norm_p(np.ones((2, 4)))
    for kw in ({"delta": 0.0}, {"delta": 1.5}, {"seed": -1}, {"rows": 0}, {"seed": 1.5}):
        with pytest.raises(ValueError):
            LpEmbedding(3, 1.0, **kw)


def test_default_rows_and_error_bound_text():
    assert default_rows(4, 1.0, 0.2) == int(np.ceil(2 * 4 * np.log(16) / 0.04))
    assert default_rows(4, 3.0, 0.2) == int(np.ceil(2 * 8 * np.log(32) / 0.04))
    emb = LpEmbedding(4, 1.0)
    assert "NOT proven" in emb.error_bound
    assert LpEmbedding(4, 1.0).norm_p(np.ones((2, 4))).tolist() == [0.0, 0.0]


# ------------------------------------------------------------ LpSketch integration and heavy_attention
import streamlev as sl  # noqa: E402
from streamlev.lp import LpSketch  # noqa: E402


def _brute(K, Q, p):
    N = np.abs(Q @ K.T) ** p
    return N / N.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("p", [1.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_heavy_attention_no_false_negatives_and_band(p, seed):
    d, n, eps, delta = 4, 8000, 0.05, 0.2
    K = _keys(n, d, seed)
    sk = LpSketch(d, eps, p=p, normalizer=True, delta=delta, seed=seed)
    for a in range(0, n, 700):
        sk.update(K[a : a + 700])
    assert sk.normalizer.levels >= 2  # the estimate is sampled, not exact
    rng = np.random.default_rng(seed + 10)
    # adversarial queries: aligned with single keys (large shares), the rare direction, singular directions
    Q = np.vstack([rng.standard_normal((150, d)), K[:20], np.linalg.svd(K, full_matrices=False)[2],
                   np.eye(d)[-1]])
    A = _brute(K, Q, p)
    H = sl.heavy_attention(sk, Q)
    assert H.shape == (Q.shape[0], n)
    true = set(zip(*np.nonzero(A >= eps)))
    got = set(zip(*H.nonzero()))
    assert true, "test must contain heavy entries"
    assert true <= got  # no false negatives
    i, j = H.nonzero()
    a_true, a_rep = A[i, j], np.asarray(H[i, j]).ravel()
    assert np.all(a_true >= eps * (1 - delta) ** 2)
    assert np.all(a_rep >= a_true / (1 + delta)) and np.all(a_rep <= a_true / (1 - delta))
    Hm, ids = sl.heavy_attention(sk, Q, id_map=True)
    assert set(zip(np.nonzero(Hm)[0], ids[np.nonzero(Hm)[1]])) == got


def test_heavy_attention_without_normalizer_says_how_to_fix():
    sk = LpSketch(3, 0.2, p=3.0).update(_keys(50, 3, 0))
    with pytest.raises(NotImplementedError, match="normalizer=True"):
        sl.heavy_attention(sk, np.ones((2, 3)))
    empty = LpSketch(3, 0.2, p=3.0, normalizer=True)
    assert sl.heavy_attention(empty, np.ones((2, 3))).nnz == 0


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_lpsketch_normalizer_merge_and_bytes(p):
    d, rows = 3, 100
    K = _keys(8 * rows, d, 4)
    one = LpSketch(d, 0.2, p=p, normalizer=True, seed=3, normalizer_rows=rows).update(K)
    a = LpSketch(d, 0.2, p=p, normalizer=True, seed=3, normalizer_rows=rows).update(K[: 4 * rows])
    b = LpSketch(d, 0.2, p=p, normalizer=True, seed=3, normalizer_rows=rows)
    b.update(K[4 * rows :], ids=np.arange(4 * rows, 8 * rows))
    b_bytes = b.to_bytes()
    a.merge(b)
    assert b.to_bytes() == b_bytes
    assert a.normalizer.to_bytes() == one.normalizer.to_bytes()
    back = LpSketch.from_bytes(a.to_bytes())
    assert back.normalizer.to_bytes() == a.normalizer.to_bytes() and back.to_bytes() == a.to_bytes()
    # different seed, or one sketch without a normalizer: refuse
    for other in (LpSketch(d, 0.2, p=p, normalizer=True, seed=4, normalizer_rows=rows),
                  LpSketch(d, 0.2, p=p)):
        other.update(K[:10], ids=np.arange(10**6, 10**6 + 10))
        before = a.to_bytes()
        with pytest.raises(ValueError, match="normalizer"):
            a.merge(other)
        assert a.to_bytes() == before


def test_lpsketch_old_bytes_without_normalizer_still_load_and_bad_input_is_atomic():
    K = _keys(300, 3, 6)
    plain = LpSketch(3, 0.2, p=1.0).update(K)
    back = LpSketch.from_bytes(plain.to_bytes())
    assert back.normalizer is None and back.to_bytes() == plain.to_bytes()
    sk = LpSketch(3, 0.2, p=1.0, normalizer=True, normalizer_rows=50).update(K)
    before = sk.to_bytes()
    bad = _keys(100, 3, 7)
    bad[60, 0] = np.inf
    with pytest.raises(ValueError):
        sk.update(bad)
    assert sk.to_bytes() == before
    with pytest.raises(TypeError):
        LpSketch(3, 0.2, normalizer="yes")
