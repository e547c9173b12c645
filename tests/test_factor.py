"""The factor update paths and the screened scoring agree with the exact reference."""

import math

import numpy as np
import pytest

from streamlev import LevSketch, _factor, _parallel
from streamlev._kernels.row_norms import row_sq_norms
from streamlev._scaled_factor import ScaledFactor
from streamlev import reference as ref
from streamlev.testing import make_keys, score_tolerance


def _factor_of(K, block):
    R = np.zeros((K.shape[1], K.shape[1]))
    for s in range(0, K.shape[0], block):
        R = _factor.update_factor(R, K[s : s + block])
    return R


@pytest.mark.parametrize("cond", [1e1, 1e3, 1e6, 1e12])  # Gram, CholeskyQR2, Householder, Householder
def test_every_update_path_reproduces_the_gram_matrix_and_scores(cond):
    K = make_keys("ill_conditioned", 600, 8, 1, cond=cond)
    R = _factor_of(K, 100)
    assert np.all(np.diag(R) >= 0) and np.array_equal(R, np.triu(R))
    np.testing.assert_allclose(R.T @ R, K.T @ K, atol=1e-13 * np.abs(K.T @ K).max())
    np.testing.assert_allclose(_factor.score_rows(R, K, 1e-13), ref.leverage_scores(K), rtol=1e-9,
                               atol=score_tolerance(K))


def test_screened_scores_are_exact_above_the_floor_and_upper_bounds_below():
    K = make_keys("heavy_tailed", 20000, 16, 3)
    R = _factor_of(K, 4096)
    exact = ref.leverage_scores(K)
    below = 0.01
    got = _factor.score_rows(R, K, 1e-13, below=below)
    hi = exact >= below
    np.testing.assert_allclose(got[hi], exact[hi], rtol=1e-9)
    assert np.all(got >= exact * (1 - 1e-9))      # never an underestimate
    assert np.all(got[~hi][got[~hi] < below] < below)
    skipped = np.sum(got != _factor.score_rows(R, K, 1e-13))
    assert skipped > K.shape[0] // 2  # the certificate does spare most of a long stream


@pytest.mark.parametrize("d", [1, 3, 64, 67])
def test_row_norm_kernel_matches_float64_sums(d):
    X = np.random.default_rng(d).standard_normal((50, d)) * np.logspace(-150, 150, 50)[:, None]
    X[7, d - 1] = np.nan
    X[9, 0] = np.inf
    sq = np.empty(50)
    row_sq_norms(X, sq)
    want = np.array([math.fsum(v * v for v in row) for row in X])
    ok = np.isfinite(want)
    np.testing.assert_allclose(sq[ok], want[ok], rtol=4 * d * np.finfo(float).eps, atol=0)
    assert np.isnan(sq[7]) and sq[9] == np.inf


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 1e200, 1e-200])
@pytest.mark.parametrize("m", [9, 8192])
def test_block_preparation_matches_the_plain_path_and_folds_to_the_same_factor(dtype, scale, m):
    K = make_keys("heavy_tailed", m, 64, 5)
    B = (K if dtype == np.float64 else K.astype(dtype)) * (scale if dtype == np.float64 else 1.0)
    for layout in ("C", "F"):
        Bl = np.asarray(B, order=layout)
        for workers in (1, 2):
            f = ScaledFactor(64)
            X0, e0 = f.prepare(Bl, False, "test")
            X, e, sq, gram = f.prepare_block(Bl, False, "test", workers)
            assert e == e0 and np.array_equal(X, X0)
            np.testing.assert_allclose(sq, np.einsum("ij,ij->i", X, X), rtol=1e-14)
            k = _parallel.parts(m, 64 * 64, workers)
            assert (gram is None) == (k == 1 or e != 0)
            if gram is not None:  # the same parts as update_factor's own split: the same factor, bit for bit
                R = _factor.update_factor(np.zeros((64, 64)), X, workers=workers, gram=gram)
                assert np.array_equal(R, _factor.update_factor(np.zeros((64, 64)), X, workers=workers))
    assert np.array_equal(B, (K if dtype == np.float64 else K.astype(dtype)) * (scale if dtype == np.float64 else 1.0))


@pytest.mark.parametrize("where", [0, 4095, 8191])  # the caller's part, the border, the worker's part
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_bad_entry_in_any_part_of_a_split_block_is_an_error_and_changes_nothing(where, bad):
    K = make_keys("gaussian", 8192, 64, 2).astype(np.float32)
    sk = LevSketch(64, 0.05, workers=2).update(K[:4096])
    before = sk.to_bytes()
    B = K.copy()
    B[where, 17] = bad
    with pytest.raises(ValueError, match="NaN or Inf in 1 rows"):
        sk.update(B)
    assert sk.to_bytes() == before
    f = ScaledFactor(64)
    with pytest.raises(ValueError, match="NaN or Inf"):
        f.prepare_block(B, False, "test", 2)
