"""Row-split threads for large Gram matrices give the serial results (to rounding) and stay exact."""

import numpy as np
import pytest

import streamlev as sl
from streamlev import _factor, _parallel
from streamlev import reference as ref
from streamlev.testing import make_keys, score_tolerance


def test_map_rows_keeps_row_order_and_small_calls_stay_serial():
    X = np.arange(40.0).reshape(10, 4)
    for k in (1, 2, 3):
        got = _parallel.map_rows(lambda Xp: Xp.copy(), X, k)
        assert len(got) == k and np.array_equal(np.concatenate(got), X)
    assert _parallel.parts(4096, 128 * 128, 2) == 2
    assert _parallel.parts(4096, 128 * 128, 1) == 1
    assert _parallel.parts(4096, 64 * 64, 2) == 2
    assert _parallel.parts(1024, 64 * 64, 2) == 1  # below the measured break-even
    assert _parallel.parts(10**6, 128 * 128, 3) == 3


def test_ranges_are_non_empty_ordered_and_the_callers_is_the_largest():
    for m in range(2, 80):
        for k in range(2, m + 1):
            cuts = _parallel._cuts(m, k)
            sizes = np.diff(cuts)
            assert cuts[0] == 0 and cuts[-1] == m and len(sizes) == k and sizes.min() >= 1
            assert sizes[0] >= sizes[1:].max() - 1
    seen = []
    _parallel.map_ranges(lambda a, b: seen.append((a, b)), 4096, 2)
    assert sorted(seen) == [(0, 2163), (2163, 4096)]  # the pool thread starts later: the caller takes more


@pytest.mark.parametrize("cond", [1e1, 1e3, 1e6, 1e12])  # Gram, CholeskyQR2, Householder, Householder
def test_split_gram_update_reproduces_the_gram_matrix(cond):
    K = make_keys("ill_conditioned", 8192, 128, 2, cond=cond)
    R1 = np.zeros((128, 128))
    R2 = R1.copy()
    for s in range(0, K.shape[0], 4096):
        R1 = _factor.update_factor(R1, K[s : s + 4096])
        R2 = _factor.update_factor(R2, K[s : s + 4096], workers=2)
    G = K.T @ K
    np.testing.assert_allclose(R2.T @ R2, G, atol=1e-13 * np.abs(G).max())
    np.testing.assert_allclose(R2, R1, atol=1e-11 * np.abs(R1).max())


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "ill_conditioned", "low_rank"])
def test_levsketch_with_two_workers_matches_one_and_the_reference(kind, monkeypatch):
    K = make_keys(kind, 12288, 128, 7)
    splits = []
    real = _parallel.map_ranges
    monkeypatch.setattr(_parallel, "map_ranges", lambda fn, m, k: splits.append(k) or real(fn, m, k))
    sks = {w: sl.LevSketch(128, 0.01, workers=w) for w in (1, 2)}
    for s in range(0, K.shape[0], 4096):
        for sk in sks.values():
            sk.update(K[s : s + 4096])
    assert 2 in splits  # the parallel path did run
    one, two = sks[1].scores(), sks[2].scores()
    assert np.array_equal(sks[1].universal_set(), sks[2].universal_set())
    assert np.array_equal(sks[2].universal_set(), ref.universal_set(K, 0.01))
    np.testing.assert_array_equal(one[0], two[0])
    if kind in ("gaussian", "heavy_tailed"):  # well conditioned: only the Gram summation order differs
        np.testing.assert_allclose(two[1], one[1], rtol=1e-12)
    else:
        np.testing.assert_allclose(two[1], one[1], rtol=1e-9, atol=score_tolerance(K))
    np.testing.assert_allclose(two[1], ref.leverage_scores(K)[two[0]], rtol=1e-9, atol=score_tolerance(K))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_workers_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="'workers' parameter of LevSketch must be an int >= 1"):
        sl.LevSketch(8, 0.1, workers=bad)


@pytest.mark.parametrize("d, m, split", [(64, 4096, True), (128, 1000, True), (16, 3, False)])
def test_split_scoring_matches_the_serial_scoring_to_rounding(d, m, split, monkeypatch):
    K = make_keys("gaussian", 4 * m + 8 * d, d, 3)
    R = _factor.update_factor(np.zeros((d, d)), K)
    X = K[-m:]
    kappa = _factor.cond_estimate(R)
    assert kappa <= _factor.KAPPA_GRAM  # the explicit-inverse path, the one that is split
    splits = []
    real = _parallel.map_ranges
    monkeypatch.setattr(_parallel, "map_ranges", lambda fn, m, k: splits.append(k) or real(fn, m, k))
    one = _factor.score_rows(R, X, 1e-13, kappa=kappa)
    assert splits == []
    two = _factor.score_rows(R, X, 1e-13, kappa=kappa, workers=2)
    assert (splits == [2]) == split
    np.testing.assert_allclose(two, one, rtol=1e-14)  # BLAS blocking may differ with the width: ~1 ulp
    np.testing.assert_allclose(two, ref.leverage_scores(K)[-m:], rtol=1e-9, atol=score_tolerance(K))


def test_gil_free_trmm_computes_row_norms_of_x_times_u():
    rng = np.random.default_rng(5)
    U = np.triu(rng.standard_normal((24, 24))) + 3 * np.eye(24)
    X = 0.01 * rng.standard_normal((50, 24))
    expect = np.einsum("ij,ij->i", X @ U, X @ U)
    assert expect.max() < 1.0
    assert _parallel.HAVE_GIL_FREE_TRMM
    np.testing.assert_allclose(_parallel.upper_t_sq_norms(np.asfortranarray(U), X), expect, rtol=1e-13)
    assert _parallel.upper_t_sq_norms(np.asfortranarray(U), X[:0]).shape == (0,)


def test_gil_free_trmm_only_for_the_signature_it_was_written_for():
    from streamlev import _parallel

    d = "__pyx_t_5scipy_6linalg_11cython_blas_d"
    good = f"void (char *, char *, char *, char *, int *, int *, {d} *, {d} *, int *, {d} *, int *)"
    assert _parallel._DTRMM_SIGNATURE.fullmatch(good)
    assert not _parallel._DTRMM_SIGNATURE.fullmatch(good.replace("_d *", "_s *"))  # single precision
    assert not _parallel._DTRMM_SIGNATURE.fullmatch(good.replace("int *)", "int *, int *)"))  # another layout
