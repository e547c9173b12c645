"""Slow, exact float64 reference implementations used by the tests.

Everything here is written for clarity, not speed (SVD-based, O(n d^2) with
large constants, or worse). Fast paths in the library are compared with these.

Numerical tolerance
-------------------
An exactly rank-deficient key matrix is, after rounding, a full-rank matrix
with singular values of the order of machine precision. streamlev therefore
defines leverage with a tiny *relative ridge*:

    tau_j = k_j^T (K^T K + lam I)^{-1} k_j,   lam = (rtol * ||K||_F)^2,

with ``rtol = DEFAULT_RTOL = 1e-13`` unless given. Directions whose singular
value is far above ``rtol * ||K||_F`` are unaffected (relative change
``(rtol ||K||_F / s)^2``); directions at round-off level are suppressed
smoothly. Unlike a hard pseudo-inverse cut-off, this definition keeps the
monotonicity that streaming relies on: adding rows never increases any tau_j
(both the Gram matrix and lam only grow).
"""

from __future__ import annotations

import numpy as np

from ._constants import DEFAULT_RTOL
from ._scaling import scale_by_max

__all__ = ["DEFAULT_RTOL", "leverage_scores", "universal_set", "worst_case_queries", "attention_x2"]


def _as_scaled(K):
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2:
        raise ValueError(f"K must be 2-D, got shape {K.shape}")
    return scale_by_max(K)


def leverage_scores(K, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Exact ridge-tolerant leverage scores of the rows of ``K`` via a full SVD.

    Parameters
    ----------
    K : array_like of shape (n, d)
    rtol : float
        Relative ridge, see the module docstring.

    Returns
    -------
    tau : ndarray of shape (n,)
    """
    Ks, _ = _as_scaled(K)
    if Ks.shape[0] == 0:
        return np.zeros(0)
    U, s, _ = np.linalg.svd(Ks, full_matrices=False)
    lam = (rtol * np.linalg.norm(Ks)) ** 2
    if s.size == 0 or s[0] == 0.0:
        return np.zeros(Ks.shape[0])
    w = s**2 / (s**2 + lam)
    return (U**2) @ w


def universal_set(K, eps: float, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Sorted int64 indices ``{j : tau_j >= eps}`` from :func:`leverage_scores`.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys.
    eps : float
        Threshold.
    rtol : float
        Relative ridge.

    Returns
    -------
    ndarray of shape (u,), int64
    """
    return np.flatnonzero(leverage_scores(K, rtol) >= eps).astype(np.int64)


def worst_case_queries(K, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Queries ``q_j = (K^T K + lam I)^{-1} k_j`` (rows), the maximisers of A_qj for x^2 attention.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys.
    rtol : float
        Relative ridge.

    Returns
    -------
    Q : ndarray of shape (n, d)
        Row j is the query that gives key j its largest share
        ``<k_j,q>^2 / ||K q||^2``, which equals tau_j (up to the ridge).
    """
    Ks, _ = _as_scaled(K)
    _, s, Vt = np.linalg.svd(Ks, full_matrices=False)
    lam = (rtol * np.linalg.norm(Ks)) ** 2
    inv = np.where(s > 0, 1.0 / (s**2 + lam), 0.0)
    return (Ks @ Vt.T) * inv @ Vt


def attention_x2(Q, K) -> np.ndarray:
    """Exact x^2 attention ``A_ij = <q_i,k_j>^2 / sum_l <q_i,k_l>^2`` (rows with zero normaliser are 0).

    Parameters
    ----------
    Q : array_like of shape (n_q, d)
        Queries.
    K : array_like of shape (n, d)
        Keys.

    Returns
    -------
    A : ndarray of shape (n_q, n)
    """
    Qs, _ = _as_scaled(Q)
    Ks, _ = _as_scaled(K)
    S = (Qs @ Ks.T) ** 2
    z = S.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(z > 0, S / np.where(z > 0, z, 1.0), 0.0)
