"""MultiHeadSketch equals one LevSketch per head; merge, bytes, atomic errors and input dtypes."""

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamlev as sl
from streamlev.datasets import load_minilm
from streamlev.multihead import MultiHeadSketch
from streamlev.testing import KINDS, make_keys, random_partition

from ._compare import assert_matches_reference


def _heads_keys(kinds, n, d, seed):
    return np.stack([make_keys(k, n, d, seed + h) for h, k in enumerate(kinds)])


@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4), n=st.integers(1, 50),
       d=st.integers(1, 6), seed=st.integers(0, 2**31), per_head=st.booleans())
@settings(max_examples=15)
def test_multihead_equals_one_sketch_per_head(kinds, n, d, seed, per_head):
    H = len(kinds)
    K = _heads_keys(kinds, n, d, seed)
    eps = np.linspace(0.05, 0.5, H) if per_head else 0.1
    mh = MultiHeadSketch(H, d, eps)
    singles = [sl.LevSketch(d, float(np.broadcast_to(eps, (H,))[h])) for h in range(H)]
    for a, b in random_partition(n, seed):
        mh.update(K[:, a:b])
        for h in range(H):
            singles[h].update(K[h, a:b])
        assert np.all(mh.num_retained <= mh.max_retained())
    np.testing.assert_array_equal(mh.n, [n] * H)
    for h in range(H):
        assert mh.sketch(h).to_bytes() == singles[h].to_bytes()  # bit-identical state
        np.testing.assert_array_equal(mh.universal_set(head=h), singles[h].universal_set())
        assert_matches_reference(mh.sketch(h), K[h])
    sets = mh.universal_set()
    assert len(sets) == H and all(np.array_equal(s, t.universal_set()) for s, t in zip(sets, singles))


def test_heavy_attention_and_top_keys_per_head_on_real_keys():
    s = load_minilm()
    K, Q = s.k[1], s.q[1]  # (12, 256, 32)
    eps = np.full(12, 0.05)
    eps[3] = 0.2
    mh = MultiHeadSketch(12, 32, eps)
    for blk in np.array_split(np.arange(256), 4):
        mh.update(K[:, blk])
    H = mh.heavy_attention(Q)
    H2 = mh.heavy_attention(Q, eps=0.3)
    for h in range(12):
        single = sl.LevSketch(32, float(eps[h]))
        for blk in np.array_split(np.arange(256), 4):  # the same blocks: bit-identical state
            single.update(K[h, blk])
        np.testing.assert_array_equal(H[h].toarray(), single.heavy_attention(Q[h]).toarray())
        np.testing.assert_array_equal(H2[h].toarray(), single.heavy_attention(Q[h], 0.3).toarray())
        ids, tau = single.scores()
        top = mh.top(5, head=h)
        assert top.size == min(5, ids.size) and np.all(np.diff(top) > 0)
        if ids.size > 5:
            assert tau[np.isin(ids, top)].min() >= tau[~np.isin(ids, top)].max()
    per = mh.top(np.arange(12))
    assert [t.size for t in per] == [min(b, r) for b, r in zip(range(12), mh.num_retained)]
    before = mh.to_bytes()
    mh.top(3)
    assert mh.to_bytes() == before  # a selection query, not a state change


def test_merge_and_bytes_round_trip():
    rng = np.random.default_rng(0)
    K = rng.standard_normal((3, 300, 5)) * np.exp(rng.standard_normal((3, 300, 1)))
    a = MultiHeadSketch(3, 5, [0.05, 0.1, 0.2]).update(K[:, :120], ids=np.arange(120))
    b = MultiHeadSketch(3, 5, [0.05, 0.1, 0.2]).update(K[:, 120:], ids=np.arange(120, 300))
    b_bytes = b.to_bytes()
    a.merge(b)
    assert b.to_bytes() == b_bytes
    whole = MultiHeadSketch(3, 5, [0.05, 0.1, 0.2]).update(K)
    for h in range(3):
        assert_matches_reference(a.sketch(h), K[h])
        np.testing.assert_array_equal(a.universal_set(head=h), whole.universal_set(head=h))
    data = a.to_bytes()
    c = MultiHeadSketch.from_bytes(data)
    assert c.to_bytes() == data and pickle.loads(pickle.dumps(c)).to_bytes() == data
    np.testing.assert_array_equal(c.n, a.n)
    np.testing.assert_array_equal(c.eps, [0.05, 0.1, 0.2])
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            MultiHeadSketch.from_bytes(data[:cut])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        MultiHeadSketch.from_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="LevSketch"):
        MultiHeadSketch.from_bytes(a.sketch(0).to_bytes())


def test_errors_leave_every_head_unchanged():
    rng = np.random.default_rng(1)
    K = rng.standard_normal((3, 40, 4))
    mh = MultiHeadSketch(3, 4, 0.1).update(K, ids=np.tile(np.arange(40), (3, 1)))
    before = mh.to_bytes()
    ids = np.tile(np.arange(100, 110), (3, 1))
    ids[2, 0] = int(mh.universal_set(head=2)[0])  # clashes with a retained id in head 2 only
    with pytest.raises(ValueError):
        mh.update(rng.standard_normal((3, 10, 4)), ids=ids)
    assert mh.to_bytes() == before
    bad = rng.standard_normal((3, 10, 4))
    bad[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mh.update(bad)
    with pytest.raises(ValueError, match=r"\(heads, m, d\)"):
        mh.update(rng.standard_normal((2, 10, 4)))
    with pytest.raises(ValueError, match="incompatible"):
        mh.merge(MultiHeadSketch(3, 4, 0.2))
    other = MultiHeadSketch(3, 4, 0.1).update(K, ids=np.tile(np.arange(40), (3, 1)))
    with pytest.raises(ValueError, match="retained by both"):
        mh.merge(other)
    assert mh.to_bytes() == before
    with pytest.raises(ValueError, match="one per head"):
        MultiHeadSketch(3, 4, [0.1, 0.2])
    with pytest.raises(ValueError):
        MultiHeadSketch(3, 4, [0.1, 0.2, 0.0])


def test_one_token_per_head_and_values():
    rng = np.random.default_rng(2)
    K = rng.standard_normal((2, 30, 3))
    V = rng.standard_normal((2, 30, 2))
    mh = MultiHeadSketch(2, 3, 0.2)
    mh.update(K[:, :20], values=V[:, :20])
    for t in range(20, 30):
        changes = mh.update(K[:, t], values=V[:, t], return_changes=True)
        assert len(changes) == 2 and all(isinstance(c, sl.Changes) for c in changes)
    for h in range(2):
        ids, keys, vals = mh.retained(h)
        np.testing.assert_array_equal(vals, V[h][ids])
        np.testing.assert_allclose(keys, K[h][ids])
        np.testing.assert_array_equal(ids, sl.LevSketch(3, 0.2).update(K[h]).universal_set())


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_dtypes_are_accepted_without_conversion(dtype):
    K = np.random.default_rng(3).standard_normal((2, 50, 4)).astype(dtype)
    mh = MultiHeadSketch(2, 4, 0.1).update(K)
    for h in range(2):
        want = sl.LevSketch(4, 0.1).update(K[h].astype(np.float64))
        assert mh.sketch(h).to_bytes() == want.to_bytes()


def test_torch_tensors_including_bfloat16():
    torch = pytest.importorskip("torch")
    K = np.random.default_rng(4).standard_normal((2, 50, 4))
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        t = torch.from_numpy(K).to(dt)
        mh = MultiHeadSketch(2, 4, 0.1).update(t, ids=torch.arange(50))
        plain = (t.float() if dt == torch.bfloat16 else t).numpy()
        ref = MultiHeadSketch(2, 4, 0.1).update(plain)
        assert mh.to_bytes() == ref.to_bytes()
        H = mh.heavy_attention(torch.from_numpy(K[:, :5]).to(dt))
        assert len(H) == 2 and H[0].shape[0] == 5


def test_one_token_per_head_decode_is_atomic_and_equals_per_head_sketches(monkeypatch):
    # the all-heads rank-one path plans every head before touching any
    taken = []
    real = MultiHeadSketch._decode_all
    monkeypatch.setattr(MultiHeadSketch, "_decode_all", lambda *a: taken.append(real(*a)) or taken[-1])
    rng = np.random.default_rng(3)
    H, d, n0 = 4, 5, 60
    K = rng.standard_normal((H, 200, d)) * rng.lognormal(0, 1, (H, 200, 1))
    V = rng.standard_normal((H, 200, 2))
    K[H - 1, 180] *= 2.0**300  # one head's key needs rescaling: every head must take the general path together
    mh = MultiHeadSketch(H, d, 0.1).update(K[:, :n0], values=V[:, :n0])
    solo = [sl.LevSketch(d, 0.1).update(K[h, :n0], values=V[h, :n0]) for h in range(H)]
    for t in range(n0, 200):
        if t % 40 == 0:
            before = mh.to_bytes()
            bad = K[:, t].copy()
            bad[H - 1, 2] = np.nan  # only the last head's key is bad
            with pytest.raises(ValueError, match="NaN"):
                mh.update(bad, values=V[:, t])
            badv = V[:, t].copy()
            badv[H - 1, 0] = np.inf
            with pytest.raises(ValueError, match="NaN or Inf"):
                mh.update(K[:, t], values=badv)
            assert mh.to_bytes() == before
        got = mh.update(K[:, t], values=V[:, t], return_changes=True)
        for h in range(H):
            want = solo[h].update(K[h, t], values=V[h, t], return_changes=True)
            np.testing.assert_array_equal(got[h].added, want.added)
            np.testing.assert_array_equal(got[h].evicted, want.evicted)
    for h in range(H):
        assert mh.retained(h)[0].tolist() == solo[h].retained()[0].tolist()
    assert sum(r is not None for r in taken) > 80  # the fast path did run
