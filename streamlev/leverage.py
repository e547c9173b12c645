"""Offline leverage scores and universal sets (the exact computation the sketch reproduces)."""

from __future__ import annotations

import numpy as np

from ._constants import CHUNK_ROWS, DEFAULT_RTOL
from ._scaled_factor import ScaledFactor
from ._validation import check_eps, check_matrix_2d, check_p, check_rtol, check_state_size
from .lewis import universal_set_p

__all__ = ["leverage_scores", "universal_set"]


def leverage_scores(K, *, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Exact leverage scores of the rows of K, in one streaming pass of O(n d^2) BLAS-3 work.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys; any real dtype (float16/32 are not copied to float64 in full).
        A 1-D array is rejected: reshape one key to (1, d) or a column to (n, 1).
    rtol : float, default=1e-13
        Relative ridge: tau_j = k_j^T (K^T K + lam I)^{-1} k_j with
        lam = (rtol ||K||_F)^2. It only affects directions whose singular value
        is within a few orders of magnitude of rtol * ||K||_F, i.e. exactly
        rank-deficient or extremely ill-conditioned keys.

    Returns
    -------
    tau : ndarray of shape (n,), float64 in [0, 1], summing to rank(K).

    Notes
    -----
    For x^2 attention, ``<q,k_j>^2 <= tau_j ||K q||^2`` for every query q, with
    equality at ``q = (K^T K)^+ k_j``: tau_j is the largest attention share any
    query can give key j.

    Examples
    --------
    >>> import numpy as np, streamlev as sl
    >>> K = np.eye(3)[[0, 0, 1, 2]]          # a duplicated key shares its leverage
    >>> np.round(sl.leverage_scores(K), 6)
    array([0.5, 0.5, 1. , 1. ])
    """
    K = check_matrix_2d(K, caller="leverage_scores")
    return _scores(K, check_rtol(rtol, caller="leverage_scores"), "leverage_scores")


def _scores(K, rtol, caller):
    """Leverage of validated keys K (2-D, finite, real)."""
    n, d = K.shape
    if n == 0:
        return np.zeros(0)
    check_state_size(d, caller=caller)
    f = ScaledFactor(d)
    for s in range(0, n, CHUNK_ROWS):  # the factor of all rows, then every row scored against it
        X, e = f.prepare(K[s : s + CHUNK_ROWS], s > 0, caller)
        if e > f.e:
            f.rescale(e, None, s > 0, caller)
        f.fold(X)
    return f.score_original(K, rtol)


def universal_set(K, eps: float, *, p: float = 2.0, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Sorted int64 indices of the keys that can receive attention >= eps from some query.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys, finite, any real dtype.
    eps : float in (0, 1]
        Smallest attention share of interest.
    p : float, default=2.0
        Attention exponent f(x) = |x|^p.
    rtol : float, default=1e-13
        Relative ridge (see :func:`leverage_scores`).

    Returns
    -------
    U : ndarray of int64, sorted; ``{j : tau_j >= eps}`` for p = 2.

    Notes
    -----
    |U| <= rank(K) / eps <= d / eps, whatever n is.
    """
    caller = "universal_set"
    eps = check_eps(eps, caller=caller)
    p = check_p(p, caller=caller)
    K = check_matrix_2d(K, caller=caller)
    if p != 2.0:
        return universal_set_p(K, eps, p=p, rtol=rtol)
    return np.flatnonzero(_scores(K, check_rtol(rtol, caller=caller), caller) >= eps).astype(np.int64)

