"""Library-level defects reported in issue #19, each pinned by a test: clear errors at the boundary."""

from __future__ import annotations

import numpy as np
import pytest

import streamlev as sl
from streamlev.query_sketch import QuerySketch
from streamlev.selectors import expected_logit_scores, key_norm_scores, keydiff_scores, select


@pytest.mark.parametrize("make", [lambda: sl.LevSketch(10**6, 0.1), lambda: sl.LpSketch(10**6, 0.1),
                                  lambda: sl.MultiHeadSketch(2, 10**6, 0.1),
                                  lambda: sl.ShiftInvariantSketch(10**6, 0.1)])
def test_huge_d_is_a_value_error_naming_the_bytes_not_a_memory_error(make):
    with pytest.raises(ValueError, match=r"d=100000[01] needs 8,000,0\d\d,\d\d\d,\d\d\d bytes"):
        make()


def test_offline_universal_set_does_not_mention_a_sketch():
    with pytest.raises(ValueError) as exc:
        sl.universal_set([[np.nan, 1.0]], 0.1)
    msg = str(exc.value)
    assert "universal_set: K contains NaN or Inf in 1 of 1 rows" in msg and "sketch" not in msg
    with pytest.raises(ValueError) as exc:
        sl.universal_set([[np.nan, 1.0]], 0.1, p=1.0)
    assert "sketch" not in str(exc.value)


def test_query_sketch_speaks_of_queries():
    qs = QuerySketch(2)
    with pytest.raises(ValueError, match="queries contains NaN") as exc:
        qs.update([np.nan, 1.0])
    assert "keys" not in str(exc.value) and qs.n == 0
    with pytest.raises(ValueError, match="queries has 3 columns"):
        qs.update(np.ones((1, 3)))


@pytest.mark.parametrize("fn", [keydiff_scores, key_norm_scores])
def test_key_scores_reject_nan(fn):
    K = np.ones((4, 3))
    K[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 4 rows"):
        fn(K)


def test_expected_logit_scores_reject_nan():
    K = np.ones((4, 3))
    K[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        expected_logit_scores(K, QuerySketch(3).update(np.eye(3)))


def test_select_rejects_nan_scores_instead_of_dropping_them():
    with pytest.raises(ValueError, match=r"NaN at position\(s\) \[1\]"):
        select([0.5, np.nan, 0.2], 2)
    np.testing.assert_array_equal(select([0.5, 0.9, 0.2], 2), [0, 1])


def test_keydiff_is_scale_invariant_and_zero_keys_score_zero():
    K = np.random.default_rng(0).standard_normal((20, 5))
    K[3] = 0.0
    s = keydiff_scores(K)
    assert s[3] == 0.0 and np.isfinite(s).all()
    for scale in (2.0**-600, 3.0, 2.0**600):
        np.testing.assert_allclose(keydiff_scores(K * scale), s, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fn", [sl.leverage_scores, lambda K: sl.universal_set(K, 0.5)])
def test_one_dimensional_input_to_offline_functions_is_an_error(fn):
    with pytest.raises(ValueError, match=r"must be 2-D of shape \(n, d\).*reshape\(1, -1\).*reshape\(-1, 1\)"):
        fn(np.ones(4))


def test_lp_sketch_update_takes_values_and_return_changes_like_levsketch():
    rng = np.random.default_rng(3)
    K = rng.standard_normal((60, 3))
    V = np.arange(120, dtype=np.float64).reshape(60, 2)
    sk = sl.LpSketch(3, 0.2, p=1.0)
    first = sk.update(K[:30], values=V[:30], return_changes=True)
    assert isinstance(first, sl.Changes) and set(first.added.tolist()) == set(sk.universal_set().tolist())
    before = sk.universal_set()
    ch = sk.update(K[30:], values=V[30:], return_changes=True)
    after = sk.universal_set()
    np.testing.assert_array_equal(ch.added, np.sort(after[after >= 30]))
    np.testing.assert_array_equal(ch.evicted, np.setdiff1d(before, after))
    ids, keys, vals = sk.retained()
    np.testing.assert_array_equal(vals, V[ids])  # each payload row travels with its key
    np.testing.assert_allclose(keys, K[ids], rtol=0, atol=0)
    again = sl.LpSketch.from_bytes(sk.to_bytes())
    assert again == sk and np.array_equal(again.retained()[2], vals)
    with pytest.raises(ValueError, match="carries values"):
        sk.update(K[:1] + 1.0, ids=[999])
    assert sk == again
    plain = sl.LpSketch(3, 0.2, p=1.0).update(K)
    assert len(plain.retained()) == 2  # no payload: the old (ids, keys) pair
