"""The triangular factor R of all keys seen (R^T R = K^T K) and leverage scoring against it.

One concept: given R, fold in a block of rows, and score rows against R with the
relative ridge of :mod:`streamlev.reference`. All arrays here are float64 and
already scaled by the caller into a safe exponent range.

Why three update paths: the Gram/Cholesky update is the fastest (BLAS-3 syrk),
but it squares the condition number, so it is accepted only when the new factor
is well conditioned (relative error of leverage ~ u * kappa^2). Moderately
ill-conditioned streams use CholeskyQR2 on the stacked [R; B] (two BLAS-3
passes, accurate to ~u; used up to kappa 1e4), and anything worse (or singular)
uses Householder QR (LAPACK tpqrt), which never forms a Gram matrix.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
from scipy.linalg import blas, lapack, svdvals

from . import _parallel

__all__ = ["blas_threads", "gram", "update_factor", "score_rows", "cond_estimate", "ridge_lambda", "dead_coordinates",
           "live_condition", "KAPPA_GRAM", "KAPPA_CHOLQR2"]

_CONTROLLER = None


def blas_threads(n: int | None):
    """Context manager limiting BLAS to ``n`` threads (``None``: leave BLAS as configured).

    Why: the sketch issues many small BLAS/LAPACK calls (d x d factors, a few
    retained rows) between large ones, and a multi-threaded OpenBLAS wakes its
    pool for each. Measured on a 2-vCPU machine (benchmarks/bench_block.py):
    the whole p=2 sketch ran 2.3x faster with one BLAS thread, and the large
    calls gained nothing from two. Parallelism across heads or shards (threads
    or processes, one sketch each) scales better.
    """
    global _CONTROLLER
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=int(n), user_api="blas")


KAPPA_GRAM = 100.0  # 1-norm condition estimate of R below which the Gram update is accurate to ~1e-12
# CholeskyQR2 is stable up to cond ~ u^(-1/2) ~ 1e8, but on an exactly rank-deficient block the
# Cholesky pivots of the Gram matrix are round-off (~sqrt(u)), which can look like cond ~ 1e6-1e8;
# a limit of 1e4 keeps a wide margin from that floor (hypothesis found three duplicate keys
# accepted at 1e7, with garbage null-space scores).
KAPPA_CHOLQR2 = 1e4
_U = np.finfo(np.float64).eps


def score_few(R: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Leverage ||R^{-T} x||^2 of a few rows of X by one BLAS trsv each (no ridge).

    For the rank-one path, where kappa(R) <= 1e4: the relative ridge of
    :func:`score_rows` then moves a score by less than (1e-13 * sqrt(d) * kappa)^2 ~ 1e-16,
    and the solve is accurate to ~ d * u * kappa, both far inside the decision band.
    """
    out = np.empty(X.shape[0])
    for i in range(X.shape[0]):
        y = blas.dtrsv(R.T, X[i], lower=1, trans=0)
        out[i] = y @ y
    return out


def solve_upper(R: np.ndarray, v: np.ndarray) -> np.ndarray:
    """u with R u = v for C-ordered upper-triangular R: one BLAS trsv, overwriting v (returned)."""
    return blas.dtrsv(R.T, v, lower=1, trans=1, overwrite_x=1)


def cond_estimate(R: np.ndarray) -> float:
    """1-norm condition number estimate of upper-triangular R (inf when singular). O(d^2)."""
    d = R.shape[0]
    if d == 0:
        return 1.0
    diag = np.abs(np.diag(R))
    if not np.all(diag > 0):
        return np.inf
    rc, info = lapack.dtrcon(R, norm="1", uplo="U", diag="N")
    if info != 0 or not rc > 0:
        return np.inf
    return 1.0 / rc


def _positive_diagonal(R: np.ndarray) -> np.ndarray:
    R = np.triu(R)
    neg = np.diag(R) < 0
    if neg.any():
        R[neg, :] *= -1.0
    return np.ascontiguousarray(R)


def _householder(R: np.ndarray, B: np.ndarray) -> np.ndarray:
    d = R.shape[0]
    a = np.array(R, order="F", copy=True)  # tpqrt overwrites both; never touch the caller's arrays
    b = np.array(B, order="F", copy=True)
    a, _, _, info = lapack.dtpqrt(0, max(1, min(32, d)), a, b, overwrite_a=1, overwrite_b=1)
    if info != 0:  # pragma: no cover - LAPACK argument error
        raise RuntimeError(f"LAPACK dtpqrt failed with info={info}")
    return _positive_diagonal(a)


def _chol(G: np.ndarray):
    # numpy's Cholesky, not scipy's: measured in place (right after the block's gemm) scipy's
    # multi-threaded potrf took 1.7-10 ms on a 128 x 128 matrix, numpy's 0.2 ms.
    try:
        return np.ascontiguousarray(np.linalg.cholesky(G).T), True
    except np.linalg.LinAlgError:
        return None, False


def update_factor(R: np.ndarray, B: np.ndarray, *, return_kappa: bool = False, workers: int = 1,
                  gram: np.ndarray | None = None):
    """Return the upper-triangular R' (non-negative diagonal) with R'^T R' = R^T R + B^T B.

    Parameters
    ----------
    R : ndarray of shape (d, d), float64, upper triangular
    B : ndarray of shape (m, d), float64
    return_kappa : bool
        Also return :func:`cond_estimate` of R' (computed anyway on the fast path).
    workers : int, default=1
        Threads for the Gram matrix of a large B (see :mod:`streamlev._parallel`);
        only the summation order of B^T B changes.
    gram : ndarray of shape (d, d), optional
        B^T B when the caller already has it (taken over and modified).

    Returns
    -------
    ndarray of shape (d, d), C-contiguous; R and B are not modified.
    """
    if return_kappa:
        Rn, kappa = _update(R, B, workers, gram)
        return Rn, (cond_estimate(Rn) if kappa is None else kappa)
    return _update(R, B, workers, gram)[0]


def gram(B: np.ndarray) -> np.ndarray:
    """B^T B of float64 rows B, shape (d, d); one gemm, measured 2-3x faster than syrk here despite twice the flops."""
    return B.T @ B


def _update(R, B, workers=1, G=None):
    if B.shape[0] == 0:
        return R.copy(), None
    if G is None:
        grams = _parallel.map_rows(gram, B, _parallel.parts(B.shape[0], B.shape[1] ** 2, workers))
        G = grams[0]
        for Gi in grams[1:]:
            G += Gi
    G += R.T @ R
    R1, ok = _chol(G)
    if ok:
        kappa = cond_estimate(R1)
        if kappa <= KAPPA_GRAM:
            return R1, kappa  # numpy's Cholesky: zeros outside the triangle, positive diagonal
        if kappa <= KAPPA_CHOLQR2:
            # CholeskyQR2: re-orthogonalise Q1 = [R; B] R1^{-1} once more.
            Q1b = blas.dtrsm(1.0, R1, np.asfortranarray(B), side=1, lower=0)
            Q1r = blas.dtrsm(1.0, R1, np.asfortranarray(R), side=1, lower=0)
            G2 = Q1b.T @ Q1b
            G2 += Q1r.T @ Q1r
            R2, ok2 = _chol(G2)
            if ok2:
                return _positive_diagonal(np.triu(R2) @ np.triu(R1)), None
    return _householder(R, B), None


def frobenius(R: np.ndarray) -> float:
    """||R||_F without BLAS (a tiny multi-threaded ddot stalls on a busy machine)."""
    return math.sqrt(float(np.einsum("ij,ij->", R, R)))


def ridge_lambda(R: np.ndarray, rtol: float) -> float:
    """lam = (rtol * ||K||_F)^2, with ||K||_F = ||R||_F."""
    return float((rtol * frobenius(R)) ** 2)


def score_rows(R: np.ndarray, X: np.ndarray, rtol: float, *, kappa: float | None = None,
               below: float | None = None, workers: int = 1, sq: np.ndarray | None = None) -> np.ndarray:
    """Leverage ``x^T (R^T R + lam I)^{-1} x`` of each row of X.

    Parameters
    ----------
    R : ndarray of shape (d, d), upper triangular factor of all keys
    X : ndarray of shape (m, d), float64 rows to score (not modified)
    rtol : relative ridge (see :mod:`streamlev.reference`)
    kappa : optional precomputed :func:`cond_estimate` of R
    below : float, optional
        Rows whose certified upper bound on tau is below this value may get that
        bound (< ``below``) instead of their exact score; callers that only keep
        rows with tau >= ``below`` lose nothing and skip most of the work.
    sq : ndarray of shape (m,), optional
        ||x||^2 of each row, when the caller has them (the bound above needs them;
        any rounding within a relative 1e-13 is covered by its margin).

    Returns
    -------
    tau : ndarray of shape (m,), in [0, 1]
    """
    m, d = X.shape
    if m == 0:
        return np.zeros(0)
    fro = frobenius(R)
    if fro == 0.0:
        return np.zeros(m)
    if kappa is None:
        kappa = cond_estimate(R)
    # The ridge changes tau by a relative ~(rtol * kappa * sqrt(d))^2; below rounding it is dropped.
    if (rtol * kappa * np.sqrt(d)) ** 2 > 1e-17:
        lam = (rtol * fro) ** 2
        R = _householder(R.copy(), np.sqrt(lam) * np.eye(d))
    if kappa <= KAPPA_GRAM and m >= 4 * d:
        # Well conditioned: multiply by the explicit inverse (trmm ran ~20% faster than trsm here);
        # the inverse of a triangle with cond <= 100 costs only ~cond * u in relative accuracy.
        Ri, info = lapack.dtrtri(R, lower=0)
        if info == 0:
            tau = np.empty(m)
            rows = np.arange(m)
            if below is not None:
                # tau_i <= ||x_i||^2 ||R^{-1}||_2^2 and ||A||_2^2 <= min(||A||_F^2, ||A||_1 ||A||_inf):
                # an O(m d) certificate that most keys of a long stream cannot reach `below`.
                aR = np.abs(Ri)
                inv2 = min(float(np.einsum("ij,ij->", Ri, Ri)), float(aR.sum(0).max() * aR.sum(1).max()))
                ub = (np.einsum("ij,ij->i", X, X) if sq is None else sq) * (inv2 * (1.0 + 1e-12))
                rows = np.flatnonzero(ub >= below)
                tau[:] = np.minimum(ub, 1.0)
            if rows.size:
                Xs = X if rows.size == m else X[rows]
                k = _parallel.parts(rows.size, d * d // 2, workers, _parallel.MIN_WORK_TRMM)
                RiF = np.asfortranarray(Ri)
                if k > 1 and _parallel.HAVE_GIL_FREE_TRMM:
                    tau[rows] = np.concatenate(_parallel.map_rows(
                        lambda Xp: _parallel.upper_t_sq_norms(RiF, Xp), Xs, k))
                else:
                    Y = blas.dtrmm(1.0, RiF, Xs.T, side=0, lower=0, trans_a=1)
                    tau[rows] = np.minimum(np.einsum("ij,ij->j", Y, Y), 1.0)
            return tau
    Y = blas.dtrsm(1.0, R, X.T, side=0, lower=0, trans_a=1)  # R^{-T} X^T, (d, m), X.T is F-ordered
    tau = np.einsum("ij,ij->j", Y, Y)
    return np.minimum(tau, 1.0)


def dead_coordinates(R: np.ndarray):
    """Indices of coordinates no key has touched (zero row and column of R), or None if R is singular otherwise.

    Keys with an identically zero coordinate (real Gemma 3 keys have 4-8 of 256) make K^T K singular,
    and the rank-one path would refuse every key. Leverage is unchanged by such a coordinate
    (K^T K is block diagonal with a zero block, and a key that does not touch it has no component
    there), so the path can run on the others as long as new keys do not touch it either.
    """
    diag = np.diagonal(R)
    zero = np.flatnonzero(diag == 0.0)
    if zero.size and (R[zero].any() or R[:, zero].any()):
        return None
    return zero


def live_condition(R: np.ndarray) -> tuple[float, float, np.ndarray]:
    """``(kappa, sigma_max, dead)``: the 2-norm condition number and largest singular value of R on the
    coordinates some key touched (one SVD), and the untouched ones (:func:`dead_coordinates`).

    kappa is inf (and sigma_max 0) when R is singular otherwise or no coordinate was touched; dead is
    then empty.
    """
    dead = dead_coordinates(R)
    if dead is None:
        return math.inf, 0.0, np.zeros(0, np.int64)
    if dead.size:
        live = np.setdiff1d(np.arange(R.shape[0]), dead)
        R = R[np.ix_(live, live)]
    if not R.size:
        return math.inf, 0.0, np.zeros(0, np.int64)
    sv = svdvals(R, check_finite=False)
    kappa = float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf
    return kappa, float(sv[0]), dead
