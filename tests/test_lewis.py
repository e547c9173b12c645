"""Tests for streamlev.lewis: Lewis weights (claims A6, A10, B5) and sensitivity upper bounds (A7)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlev.lewis import (LewisConvergenceError, LewisConvergenceWarning, lewis_weights,
                             sensitivity_upper_bounds)
from streamlev.reference import leverage_scores
from streamlev.sensitivity import sensitivities

HSET = settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
P_ALL = [0.5, 1.0, 1.5, 3.0, 4.0, 6.0]


def _make_K(seed: int, n: int, d: int, kind: str) -> np.ndarray:
    """Random keys: Gaussian, heavy-tailed row scales, rank-deficient, or with zero/duplicate rows."""
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((n, d))
    if kind == "scaled":
        K *= np.exp(2.0 * rng.standard_normal((n, 1)))
    elif kind == "lowrank" and d > 1:
        K = rng.standard_normal((n, d - 1)) @ rng.standard_normal((d - 1, d))
    elif kind == "zeros_dups":
        K[rng.integers(0, n)] = 0.0
        K[rng.integers(0, n)] = K[0]
    return K


keys = st.builds(_make_K, st.integers(0, 2**31 - 1), st.integers(8, 60), st.integers(1, 5),
                 st.sampled_from(["gauss", "scaled", "lowrank", "zeros_dups"]))


def _fixed_point_residual(K: np.ndarray, w: np.ndarray, p: float) -> float:
    """Independent check (pinv via SVD): max_j |log(w_j^{2/p} / k_j^T (K^T W^{1-2/p} K)^+ k_j)|."""
    nz = np.any(K != 0, axis=1)
    Kn, wn = K[nz], w[nz]
    M = Kn.T @ (wn[:, None] ** (1.0 - 2.0 / p) * Kn)
    q = np.einsum("ij,jk,ik->i", Kn, np.linalg.pinv(M, rcond=1e-12, hermitian=True), Kn)
    return float(np.max(np.abs(np.log(wn ** (2.0 / p) / q))))


# ----------------------------------------------------------------------------- A6: fixed point, sum


@HSET
@given(K=keys, p=st.sampled_from(P_ALL))
def test_fixed_point_and_sum_equals_rank(K, p):
    w, info = lewis_weights(K, p, return_info=True)
    assert info["converged"] and info["residual"] <= 1e-10
    assert np.all(w >= 0) and np.all(w <= 1 + 1e-9)
    zero = ~np.any(K != 0, axis=1)
    assert np.all(w[zero] == 0)
    if (~zero).any():
        assert _fixed_point_residual(K, w, p) <= 1e-6  # claim A6
    assert abs(w.sum() - np.linalg.matrix_rank(K)) <= 1e-6  # sum w = rank


def test_p2_is_leverage():
    K = _make_K(3, 80, 5, "scaled")
    np.testing.assert_allclose(lewis_weights(K, 2.0), leverage_scores(K), rtol=1e-10, atol=1e-14)


def test_invariances_of_weights():
    rng = np.random.default_rng(11)
    K = rng.standard_normal((50, 4))
    R = rng.standard_normal((4, 4))
    for p in (1.0, 3.0, 6.0):
        w = lewis_weights(K, p)
        np.testing.assert_allclose(lewis_weights(K @ R, p), w, rtol=1e-8)
        np.testing.assert_allclose(lewis_weights(K * 2.0**600, p), w, rtol=1e-12)  # power-of-two scaling
        np.testing.assert_allclose(lewis_weights(K * 2.0**-600, p), w, rtol=1e-12)
        perm = rng.permutation(50)
        np.testing.assert_allclose(lewis_weights(K[perm], p), w[perm], rtol=1e-8)


def test_zero_rows_and_negative_exponent_no_warnings():
    # p < 2 has W^{1-2/p} with a negative exponent: zero rows must never be raised to it
    K = np.vstack([np.zeros((3, 3)), np.random.default_rng(0).standard_normal((10, 3)), np.zeros((1, 3))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p in (0.5, 1.0, 3.0, 6.0):
            w = lewis_weights(K, p)
            assert np.all(w[:3] == 0) and w[-1] == 0 and abs(w.sum() - 3) < 1e-8
            assert np.all(sensitivity_upper_bounds(K, p)[[0, 1, 2, 13]] == 0)
    assert np.all(lewis_weights(np.zeros((4, 2)), 1.0) == 0)
    assert lewis_weights(np.zeros((0, 3)), 1.0).shape == (0,)


def test_extreme_row_scales():
    rng = np.random.default_rng(5)
    K = rng.standard_normal((30, 3)) * np.logspace(-150, 150, 30)[:, None]
    for p in (1.0, 6.0):
        w = lewis_weights(K, p)
        # the relative ridge suppresses directions ~1e-150 below ||K||_F, so sum w is the ridge rank
        assert np.all(np.isfinite(w)) and 1.99 <= w.sum() <= 3 + 1e-6


def test_unique_direction_gets_one():
    K = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 2.0, 0], [0, 0, 3.0]])
    for p in (0.5, 1.0, 3.0, 6.0):
        w = lewis_weights(K, p)
        np.testing.assert_allclose(w[[0, 3]], 1.0, rtol=1e-9)


# ----------------------------------------------------------------------------- B5: contraction


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 3.0, 3.5])
def test_cohen_peng_contraction(p):
    K = np.random.default_rng(42).standard_normal((300, 5))
    w, info = lewis_weights(K, p, return_info=True)
    assert info["method"] == "cohen-peng"
    s = info["steps"]
    ratios = s[1:][s[:-1] > 1e-8] / s[:-1][s[:-1] > 1e-8]
    assert ratios.size >= 3
    assert ratios.max() <= abs(1 - p / 2) + 1e-3
    # the proven a-posteriori distance bound to the exact fixed point is small
    assert info["error_bound"] <= 1e-9


@pytest.mark.parametrize("p", [4.0, 5.0, 6.0, 8.0, 12.0])
def test_large_p_converges(p):
    K = _make_K(9, 400, 6, "scaled")
    w, info = lewis_weights(K, p, return_info=True)
    assert info["method"] == "damped-tau" and info["converged"]
    assert info["iterations"] <= 120
    assert _fixed_point_residual(K, w, p) <= 1e-6


def test_non_convergence_raises_with_details():
    K = np.random.default_rng(1).standard_normal((100, 4))
    with pytest.raises(LewisConvergenceError, match=r"p=0\.5.*in 2 iterations.*residual") as exc:
        lewis_weights(K, 0.5, max_iter=2)
    assert isinstance(exc.value, RuntimeError)
    assert exc.value.weights.shape == (100,) and not exc.value.info["converged"]


# ----------------------------------------------------------------------------- A10: non-monotonicity

# Found by a fixed-seed search (numpy default_rng(2024), entries rounded to 0.1); see the test docstring.
K_A10_P3 = np.array([[0.6, -0.2], [-0.8, 0.6], [0.2, -0.1], [-1.2, 0.1],
                     [0.7, 1.0]])  # last row is the added one
K_A10_P6 = np.array([[0.1, 0.7], [0.6, -0.7], [-0.4, 0.3], [-1.6, 0.8],
                     [1.2, 0.7]])  # default_rng(2024), trial 32 of a 5x2 search


def test_lewis_weight_increases_when_row_added_p3():
    """Claim A10: adding a row can RAISE an existing Lewis weight for p > 2 (never a sensitivity)."""
    p = 3.0
    K = K_A10_P3
    w_before = lewis_weights(K[:-1], p)
    w_after = lewis_weights(K, p)[:-1]
    assert w_after[0] > 1.3 * w_before[0]  # 0.0678 -> 0.0902
    # exact sensitivities are monotone (A9) and the upper bounds stay valid on both sets
    a_before, a_after = sensitivities(K[:-1], p), sensitivities(K, p)
    assert np.all(a_after[:-1] <= a_before * (1 + 1e-7))
    assert np.all(a_before <= sensitivity_upper_bounds(K[:-1], p))
    assert np.all(a_after <= sensitivity_upper_bounds(K, p))


def test_lewis_weight_increases_when_row_added_p6():
    p = 6.0
    w_before = lewis_weights(K_A10_P6[:-1], p)
    w_after = lewis_weights(K_A10_P6, p)[:-1]
    assert w_after[2] > 1.5 * w_before[2]  # 5.29e-4 -> 8.43e-4
    a_before, a_after = sensitivities(K_A10_P6[:-1], p), sensitivities(K_A10_P6, p)
    assert np.all(a_after[:-1] <= a_before * (1 + 1e-7))


# ----------------------------------------------------------------------------- A7: upper bounds


@HSET
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 4), p=st.sampled_from(P_ALL + [2.0]),
       kind=st.sampled_from(["gauss", "scaled", "lowrank", "zeros_dups"]))
def test_upper_bounds_dominate_exact_sensitivities(seed, d, p, kind):
    n = 14 if p < 1 else 30
    K = _make_K(seed, n, d, kind)
    alpha = sensitivities(K, p)
    ub = sensitivity_upper_bounds(K, p)
    assert np.all(alpha <= ub * (1 + 1e-7) + 1e-15)
    assert np.all((ub >= 0) & (ub <= 1))
    w = lewis_weights(K, p)
    r = max(np.linalg.matrix_rank(K), 1)
    # ub is never looser than the textbook bound (clipped), up to the 1e-9 round-off margin
    textbook = np.minimum(w if p <= 2 else r ** (p / 2 - 1) * w, 1.0)
    assert np.all(ub <= textbook * (1 + 1e-8) + 1e-15)


def test_upper_bounds_valid_from_unconverged_iterate():
    rng = np.random.default_rng(8)
    K = rng.standard_normal((40, 3)) * np.exp(rng.standard_normal((40, 1)))
    for p in (0.5, 1.0, 3.0, 6.0):
        with pytest.warns(LewisConvergenceWarning, match="valid but looser"):
            ub = sensitivity_upper_bounds(K, p, max_iter=1)
        assert np.all(sensitivities(K, p) <= ub * (1 + 1e-7))


def test_p2_upper_bound_is_leverage():
    K = _make_K(4, 50, 4, "gauss")
    np.testing.assert_allclose(sensitivity_upper_bounds(K, 2.0), leverage_scores(K), rtol=1e-8)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("func", [lewis_weights, sensitivity_upper_bounds])
def test_bad_inputs(func):
    K = np.ones((5, 2))
    bad = K.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 of 5 rows"):
        func(bad, 1.0)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        func(bad, 1.0)
    with pytest.raises(ValueError, match=r"2-D array of shape \(n, d\).*ndim=1"):
        func(np.ones(5), 1.0)
    with pytest.raises(ValueError, match=r"ndim=3"):
        func(np.ones((2, 3, 4)), 1.0)
    with pytest.raises(TypeError, match=r"real numbers.*complex"):
        func(K.astype(complex), 1.0)
    for p in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match=r"'p' parameter.*\(0, inf\)"):
            func(K, p)
    with pytest.raises(TypeError, match=r"'p' parameter"):
        func(K, "1")
    with pytest.raises(ValueError, match=r"'tol' parameter.*Got 0\.0"):
        func(K, 1.0, tol=0.0)
    with pytest.raises(ValueError, match=r"'rtol' parameter"):
        func(K, 1.0, rtol=-1e-3)
    with pytest.raises(ValueError, match=r"'max_iter'.*Got 0"):
        func(K, 1.0, max_iter=0)


@pytest.mark.slow
def test_timing_large():  # pragma: no cover - benchmark, run with -m slow
    import time

    K = np.random.default_rng(0).standard_normal((65536, 64))
    t = time.perf_counter()
    w, info = lewis_weights(K, 1.0, return_info=True)
    per_eval = (time.perf_counter() - t) / info["evaluations"]
    assert per_eval < 1.0 and abs(w.sum() - 64) < 1e-6
