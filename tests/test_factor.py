"""The factor update paths and the screened scoring agree with the exact reference."""

import numpy as np
import pytest

from streamlev import _factor
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
