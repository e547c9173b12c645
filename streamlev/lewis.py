"""l_p Lewis weights and deterministic upper bounds on |x|^p sensitivities.

For f(x) = |x|^p the LevAttention universal set is ``{j : alpha_j >= eps}``
with ``alpha_j = sup_q |<k_j,q>|^p / ||K q||_p^p`` (paper notes, section 3).
Exact ``alpha`` is expensive (see :mod:`streamlev.sensitivity`). Lewis weights
give cheap bounds within a factor ``d^{|p/2-1|}`` of it (notes, section 9.2).

Numerical conventions follow :mod:`streamlev.reference`: every leverage score
here is the relative-ridge score ``a_j^T (A^T A + lam I)^{-1} a_j`` with
``lam = (rtol * ||A||_F)^2`` for the *weighted* matrix ``A = W^{1/2-1/p} K``.
The ridge is linear in the weights, so the Cohen-Peng contraction argument
carries over unchanged, and the Lewis weights of an exactly rank-deficient K
sum to ``rank(K)`` up to ``O(rtol^2 * cond^2)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg as sla

from ._constants import DEFAULT_RTOL, LEWIS_TIGHT_TOL
from ._scaling import scale_by_max
from ._validation import check_matrix, check_matrix_2d, check_max_iter, check_p, check_positive_float

__all__ = ["lewis_weights", "sensitivity_upper_bounds", "LewisConvergenceError", "LewisConvergenceWarning",
           "universal_set_p"]

# The Gram/Cholesky path loses ~cond(G) * eps relative accuracy in tau; above
# this condition number we switch to Householder QR of the ridge-augmented matrix.
_CHOL_MAX_COND = 1e4
# Multiplicative safety margin on the upper bounds for rounding in the
# leverage evaluation (cond(G) <= 1e4 or QR: observed errors ~1e-13).
_ROUNDOFF_MARGIN = 1e-9
_TINY = np.finfo(np.float64).tiny


class LewisConvergenceError(RuntimeError):
    """The Lewis-weight iteration did not reach ``tol`` within ``max_iter`` iterations.

    Attributes
    ----------
    weights : ndarray of shape (n,)
        The last iterate (not a fixed point to ``tol``).
    info : dict
        The same diagnostics ``lewis_weights(..., return_info=True)`` returns.
    """

    def __init__(self, message: str, weights: np.ndarray, info: dict):
        super().__init__(message)
        self.weights = weights
        self.info = info


class LewisConvergenceWarning(RuntimeWarning):
    """Issued by :func:`sensitivity_upper_bounds` when the Lewis iteration stopped early.

    The returned bounds are still valid upper bounds (they are certified a
    posteriori, see :func:`sensitivity_upper_bounds`), just looser.
    """


# --------------------------------------------------------------------------- leverage


def _ridge_leverage(A: np.ndarray, rtol: float) -> np.ndarray:
    """``tau_j = a_j^T (A^T A + lam I)^{-1} a_j``, ``lam = (rtol ||A||_F)^2``; A has max row norm 1.

    Gram + Cholesky (O(n d^2), BLAS-3) when ``cond(A^T A + lam I) <= _CHOL_MAX_COND``,
    otherwise Householder QR of ``[A; sqrt(lam) I]``, which is backward stable.
    """
    n, d = A.shape
    lam = rtol * rtol * float(np.einsum("ij,ij->", A, A))
    G = A.T @ A
    G[np.diag_indices(d)] += lam
    L = None
    try:
        L = np.linalg.cholesky(G)
        sv = np.linalg.svd(L, compute_uv=False)
        if not (sv[-1] > 0 and (sv[0] / sv[-1]) ** 2 <= _CHOL_MAX_COND):
            L = None
    except np.linalg.LinAlgError:
        L = None
    if L is not None:
        Y = sla.solve_triangular(L, A.T, lower=True, check_finite=False)
    else:
        Aug = np.empty((n + d, d), order="F")
        Aug[:n] = A
        Aug[n:] = math.sqrt(lam) * np.eye(d)
        R = sla.qr(Aug, mode="r", overwrite_a=True, check_finite=False)[0][:d]
        Y = sla.solve_triangular(R, A.T, trans="T", lower=False, check_finite=False)
    return np.einsum("ij,ij->j", Y, Y)


def _drop_null_directions(U: np.ndarray) -> np.ndarray:
    """Express the rows of ``U`` in a basis of its numerical row space.

    In directions whose singular value is at rounding level (at most
    ``max(n, d) * eps * s_max``, numpy's ``matrix_rank`` default) the ridge
    leverage is not computable: a backward error ``eps ||U||`` against a ridge
    ``rtol ||U||_F`` perturbs tau by up to ``(eps/rtol)^2 ~ 1e-6``, which stalls
    the iteration above ``tol``. Removing them changes tau only at that level.
    Well-conditioned U (checked through the Cholesky factor of its Gram
    matrix) is returned unchanged without a QR.
    """
    n, d = U.shape
    if n == 0 or d == 0:
        return U
    try:
        sv = np.linalg.svd(np.linalg.cholesky(U.T @ U), compute_uv=False)
        if sv[-1] > 0 and (sv[0] / sv[-1]) ** 2 <= _CHOL_MAX_COND:
            return U
    except np.linalg.LinAlgError:
        pass
    R = sla.qr(np.asfortranarray(U), mode="r", check_finite=False)[0][: min(n, d)]
    _, s, Vt = np.linalg.svd(R)
    r = int(np.sum(s > s[0] * max(n, d) * np.finfo(np.float64).eps))
    return U if r == d else U @ Vt[:r].T


class _WeightedLeverage:
    """Evaluates ``tau(W^{1/2-1/p} K)`` on the nonzero rows, overflow-safe.

    Rows are stored as unit vectors with their log-norms, and the row scales
    ``w_j^{1/2-1/p} ||k_j||`` are formed in log space and shifted so the largest
    is 1. Leverage is invariant to a global scale, so this changes nothing
    mathematically but keeps huge/tiny magnitudes and tiny weights finite.
    """

    def __init__(self, K: np.ndarray, p: float, rtol: float):
        m = np.max(np.abs(K), axis=1) if K.shape[1] else np.zeros(K.shape[0])
        self.nz = m > 0  # exactly-zero rows are excluded: weight 0, no division
        Kn = K[self.nz] / m[self.nz, None]  # entries in [-1, 1]: squaring cannot overflow/underflow badly
        nrm = np.sqrt(np.einsum("ij,ij->i", Kn, Kn))
        self.U = _drop_null_directions(Kn / nrm[:, None])
        self.lognorm = np.log(m[self.nz]) + np.log(nrm)
        self.c = 0.5 - 1.0 / p
        self.rtol = rtol
        self.evaluations = 0

    def __call__(self, logw: np.ndarray) -> np.ndarray:
        e = self.c * logw + self.lognorm
        s = np.exp(e - e.max())
        self.evaluations += 1
        tau = _ridge_leverage(self.U * s[:, None], self.rtol)
        # a row whose scale underflowed has tau = 0; keep log finite (weight ~ 1e-308)
        return np.maximum(tau, _TINY)


# --------------------------------------------------------------------------- iteration


def _default_max_iter(rate: float, tol: float) -> int:
    # enough steps to shrink an initial residual of 1e3 to tol at the given rate, plus slack
    rate = min(max(rate, 1e-3), 1.0 - 1e-6)
    return int(math.ceil(math.log(1e3 / tol) / -math.log(rate))) + 50


def _lewis_core(K: np.ndarray, p: float, tol: float, max_iter: int | None, rtol: float):
    """Run the iteration without raising; return ``(w, tau_at_w, info)`` (full length n)."""
    n = K.shape[0]
    lev = _WeightedLeverage(K, p, rtol)
    nnz = int(lev.nz.sum())
    w = np.zeros(n)
    tau_full = np.zeros(n)
    if p < 4.0:
        method, theta, rate = "cohen-peng", p / 2.0, abs(1.0 - p / 2.0)
    else:
        # damped tau-iteration; theta = 2p/(p+2) minimises the local rate (see lewis_weights Notes)
        method, theta, rate = "damped-tau", 2.0 * p / (p + 2.0), (p - 2.0) / (p + 2.0)
    info = {"method": method, "theta": theta, "rate": rate, "iterations": 0, "residual": 0.0,
            "residuals": np.zeros(0), "steps": np.zeros(0), "converged": True, "rejected": 0,
            "error_bound": 0.0, "evaluations": 0}
    if nnz == 0:
        return w, tau_full, info
    if max_iter is None:
        max_iter = _default_max_iter(rate, tol)

    logw = np.log(lev(np.zeros(nnz)))  # start from the leverage scores (the p = 2 Lewis weights)
    residuals, steps = [], []
    if p == 2.0:
        logtau, r = logw, 0.0
        residuals.append(0.0)
    else:
        prev = None
        it = 0
        theta_min, theta_max = theta / 16.0, theta
        while True:
            logtau = np.log(lev(logw))
            g = logtau - logw
            r = float(np.max(np.abs(g)))
            merit = float(np.sqrt(np.sum(np.exp(logtau) * g * g)))
            if (method == "damped-tau" and prev is not None and theta > theta_min
                    and merit > 1.25 * prev[3] and merit > 1e-9 * math.sqrt(float(np.sum(np.exp(logtau))))):
                # safeguard (no global contraction proof for p >= 4): reject a step that clearly
                # increases the merit (not round-off, hence the 1.25 and the floor) and halve theta
                info["rejected"] += 1
                logw, logtau, r, merit = prev
                steps.pop()
                theta = max(0.5 * theta, theta_min)
            else:
                residuals.append(r)
                if prev is not None:
                    theta = min(2.0 * theta, theta_max)  # recover after a rejection
            if r <= tol or it >= max_iter:
                break
            prev = (logw, logtau, r, merit)
            logw = logw + theta * (logtau - logw)
            steps.append(theta * r)
            it += 1
        info["iterations"] = it
        info["converged"] = bool(r <= tol)
        info["theta"] = theta
    w[lev.nz] = np.exp(logw)
    tau_full[lev.nz] = np.exp(logtau)
    info["residual"] = r
    info["residuals"] = np.asarray(residuals)
    info["steps"] = np.asarray(steps)
    info["evaluations"] = lev.evaluations
    if method == "cohen-peng" and rate < 1.0:
        # Banach: d(w, w*) <= d(w, F(w)) / (1 - rate), and d(w, F(w)) = theta * r
        info["error_bound"] = (p / 2.0) * r / (1.0 - rate)
    else:
        info["error_bound"] = None if p != 2.0 else 0.0
    return w, tau_full, info


def _checked_core(K, p, tol, max_iter, rtol, caller):
    """Validate the public arguments once and run the iteration: (p, tol, rtol, K, w, tau, info)."""
    p = check_p(p, caller=caller)
    K = check_matrix(K, caller=caller)
    tol = check_positive_float(tol, name="tol", caller=caller)
    rtol = check_positive_float(rtol, name="rtol", caller=caller, upper=1.0)
    max_iter = check_max_iter(max_iter, caller=caller)
    w, tau, info = _lewis_core(K, p, tol, max_iter, rtol)
    return p, tol, rtol, K, w, tau, info


def lewis_weights(K, p, *, tol: float = 1e-10, max_iter: int | None = None, rtol: float = DEFAULT_RTOL,
                  return_info: bool = False):
    """l_p Lewis weights of the rows of ``K``.

    The Lewis weights are the unique ``w >= 0`` with
    ``w_j^{2/p} = k_j^T (K^T W^{1-2/p} K)^+ k_j`` for every nonzero row, i.e.
    ``w = tau(W^{1/2-1/p} K)``; zero rows get weight 0.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys, one per row. Real, finite; converted to float64.
    p : float
        Exponent, ``0 < p < inf``. ``p = 2`` returns the leverage scores.
    tol : float, default 1e-10
        Stop when the fixed-point residual ``max_j |log(w_j / tau_j(w))|`` is at
        most ``tol``, where ``tau_j(w) = tau_j(W^{1/2-1/p} K)`` (this equals
        ``max_j |log(w_j^{2/p} / k_j^T (K^T W^{1-2/p} K)^{-1} k_j)|``, claim A6).
    max_iter : int or None
        Maximum number of updates. ``None`` chooses enough for the method's
        rate to reduce a residual of 1e3 to ``tol``, plus 50.
    rtol : float, default ``DEFAULT_RTOL`` (1e-13)
        Relative ridge ``lam = (rtol ||W^{1/2-1/p} K||_F)^2`` in every leverage
        evaluation, as in :mod:`streamlev.reference`.
    return_info : bool, default False
        Also return a dict of diagnostics: ``method`` ("cohen-peng" or
        "damped-tau"), ``iterations``, ``residual`` (of the returned w),
        ``residuals`` (ndarray, residual of every accepted iterate including
        the start), ``steps`` (ndarray, ``max_j |log(w_{t+1,j}/w_{t,j})|`` per
        update), ``theta``, ``rate``, ``rejected``, ``converged``,
        ``error_bound`` (Cohen-Peng only: proven bound on
        ``max_j |log(w_j / w*_j)|``; None otherwise) and ``evaluations``.

    Returns
    -------
    w : ndarray of shape (n,)
        Lewis weights; ``sum(w) = rank(K)`` up to the ridge and ``tol``.
    info : dict
        Only when ``return_info=True``.

    Raises
    ------
    ValueError
        ``K`` not 2-D or not finite; ``p``, ``tol`` or ``rtol`` not positive.
    TypeError
        Non-real ``K`` or non-numeric parameters.
    LewisConvergenceError
        (a ``RuntimeError``) when ``tol`` is not reached within ``max_iter``;
        the message names p, the iteration count and the residual, and the
        exception carries ``.weights`` and ``.info``.

    Notes
    -----
    All iterations are updates in log space,
    ``log w <- log w + theta (log tau(w) - log w)``, started at the leverage
    scores; one leverage evaluation (O(n d^2)) per update.

    * ``0 < p < 4``: Cohen-Peng, ``theta = p/2``, i.e.
      ``w <- (k_j^T (K^T W^{1-2/p} K)^{-1} k_j)^{p/2}``. It contracts by
      ``|1 - p/2|`` per step in the metric ``max_j |log(u_j/w_j)|`` (the
      quadratic form is monotone and homogeneous in ``W^{1-2/p}``; the ridge
      is linear in the weights so this survives regularisation), hence the
      returned ``w`` is within ``error_bound`` of the exact fixed point.
    * ``p >= 4``: Cohen-Peng diverges. We use the tau-iteration damped with
      ``theta = 2p/(p+2)``. The linearisation of ``log tau`` at any point is
      ``(1-2/p)(I - P)`` with ``P`` row-stochastic, spectrum in [0, 1], so the
      update's Jacobian has eigenvalues in ``[1-theta, 1-2 theta/p]``;
      ``theta = 2p/(p+2)`` balances the two ends, giving local rate
      ``(p-2)/(p+2)`` (0.33 at p=4, 0.5 at p=6) versus ``1-2/p`` for the plain
      tau-iteration (``theta = 1``). There is no global contraction proof, so
      a step that increases the residual is rejected and ``theta`` halved
      (counted in ``info["rejected"]``).

    Errors of the returned weights never compromise
    :func:`sensitivity_upper_bounds`, which certifies its bound a posteriori.

    References
    ----------
    M. B. Cohen and R. Peng, "Lp row sampling by Lewis weights", STOC 2015,
    arXiv:1412.0588.
    LevAttention: "Time, space and streaming efficient algorithm for heavy
    attentions", arXiv:2410.05462.

    Examples
    --------
    >>> import numpy as np
    >>> K = np.random.default_rng(0).standard_normal((100, 3))
    >>> w = lewis_weights(K, 1.0)
    >>> round(float(w.sum()), 8)
    3.0
    """
    p, tol, _, K, w, _, info = _checked_core(K, p, tol, max_iter, rtol, "lewis_weights")
    if not info["converged"]:
        raise LewisConvergenceError(
            f"lewis_weights: the {info['method']} iteration for p={p:g} did not converge in "
            f"{info['iterations']} iterations: fixed-point residual max_j |log(w_j/tau_j(w))| = "
            f"{info['residual']:.3e} > tol={tol:.3e}. Increase max_iter or tol; "
            f"sensitivity_upper_bounds still gives valid bounds from a non-converged iterate.",
            w, info)
    return (w, info) if return_info else w


def sensitivity_upper_bounds(K, p, *, rtol: float = DEFAULT_RTOL, tol: float = 1e-10,
                             max_iter: int | None = None) -> np.ndarray:
    """Deterministic upper bounds on the |x|^p sensitivities of the rows of ``K``.

    Returns ``ub`` with ``|<k_j, q>|^p <= ub_j * ||K q||_p^p`` for every query
    ``q`` (see Notes for the ridge caveat), so ``{j : ub_j >= eps}`` contains
    the universal set ``{j : alpha_j >= eps}``.

    Parameters
    ----------
    K : array_like of shape (n, d)
    p : float
        ``0 < p < inf``.
    rtol : float, default ``DEFAULT_RTOL``
        Relative ridge for the leverage evaluations.
    tol : float, default 1e-10
        Target fixed-point residual of the Lewis iteration.
    max_iter : int or None
        As in :func:`lewis_weights`. If the iteration does not converge a
        :class:`LewisConvergenceWarning` is issued and the (looser but still
        valid) bound from the last iterate is returned.

    Returns
    -------
    ub : ndarray of shape (n,)
        In [0, 1]; 0 for zero rows. For ``p = 2`` the leverage scores.

    Notes
    -----
    Let ``w > 0`` be *any* positive weights on the nonzero rows (here the
    returned Lewis iterate), ``tau = tau(W^{1/2-1/p} K)``,
    ``q_j = k_j^T (K^T W^{1-2/p} K)^{-1} k_j = tau_j / w_j^{1-2/p}`` and
    ``F_j = q_j^{p/2} = w_j (tau_j / w_j)^{p/2}`` (the Cohen-Peng image of w).
    Cauchy-Schwarz gives ``|x_j|^2 <= q_j S`` with ``x = Kq``,
    ``S = sum_l w_l^{1-2/p} x_l^2``. Then, exactly and for any w:

    * ``p < 2``: writing ``x_l^2 = |x_l|^{2-p} |x_l|^p`` and bounding
      ``|x_l|^{2-p}`` by Cauchy-Schwarz gives
      ``S^{p/2} <= m ||x||_p^p`` with ``m = max_l (tau_l / w_l)^{1-p/2}``, so
      ``alpha_j <= F_j * m``. Also ``alpha_j <= tau_j(K)^{p/2}`` (because
      ``||x||_2 <= ||x||_p``). We return the minimum of the two.
    * ``p > 2``: Hoelder gives ``S <= (sum_l w_l)^{1-2/p} ||x||_p^2``, so
      ``alpha_j <= F_j * (sum_l w_l)^{p/2-1}``. ``sum w`` replaces the rank
      ``r`` of the textbook bound ``r^{p/2-1} w_j``: it is what the proof
      needs, equals ``rank(K)`` at the fixed point, and needs no rank decision.

    At an exact fixed point ``F = w`` and ``m = 1``, recovering ``w_j``
    (p < 2) and ``r^{p/2-1} w_j`` (p > 2). For an iterate with residual
    ``rho = max_j |log(w_j/tau_j)|`` the inflation over those textbook values
    is at most ``exp(rho)`` (p < 2) and ``exp(p rho / 2)`` (p > 2), but we
    never use ``rho``: the bound is evaluated directly, so it holds however
    far the iteration got. A factor ``1 + 1e-9`` covers rounding in the
    leverage evaluation, then the result is clipped to [0, 1]
    (``alpha_j <= 1`` always).

    Ridge caveat (shared with :mod:`streamlev.reference`): ``q_j`` uses the
    ridge ``lam``, so strictly the inequality is
    ``|x_j|^2 <= q_j (S + lam ||q||^2)``; the bound is exact for queries
    whose ``||Kq||`` is not at round-off level ``rtol ||K||_F ||q||``.

    References
    ----------
    M. B. Cohen and R. Peng, arXiv:1412.0588; LevAttention, arXiv:2410.05462
    (paper notes sections 3.3 and 9.2).

    Examples
    --------
    >>> import numpy as np
    >>> K = np.random.default_rng(1).standard_normal((50, 2))
    >>> ub = sensitivity_upper_bounds(K, 1.0)
    >>> bool(ub.sum() <= 2 * (1 + 1e-6))
    True
    """
    p, tol, rtol, K, w, tau, info = _checked_core(K, p, tol, max_iter, rtol, "sensitivity_upper_bounds")
    if not info["converged"]:
        warnings.warn(f"sensitivity_upper_bounds: the Lewis iteration for p={p:g} stopped after "
                      f"{info['iterations']} iterations with residual {info['residual']:.3e} > tol={tol:.3e}; "
                      f"the returned bounds are valid but looser.", LewisConvergenceWarning, stacklevel=2)
    nz = w > 0
    ub = np.zeros(K.shape[0])
    if p == 2.0:
        ub[nz] = tau[nz]
    else:
        ratio = tau[nz] / w[nz]
        F = w[nz] * ratio ** (p / 2.0)
        if p < 2.0:
            m = float(np.max(ratio ** (1.0 - p / 2.0)))
            tau0 = _WeightedLeverage(K, 2.0, rtol)(np.zeros(int(nz.sum())))  # plain leverage of K
            ub[nz] = np.minimum(F * m, tau0 ** (p / 2.0))
        else:
            ub[nz] = F * float(np.sum(w[nz])) ** (p / 2.0 - 1.0)
    return np.clip(ub * (1.0 + _ROUNDOFF_MARGIN), 0.0, 1.0)


def universal_set_p(K, eps: float, *, p: float, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Offline superset of ``{j : alpha_j >= eps}`` for |x|^p attention from certified bounds.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Finite keys.
    eps : float in (0, 1]
        Smallest attention share of interest.
    p : float
        Attention exponent, > 0.
    rtol : float, default=1e-13
        Relative ridge of every leverage evaluation.

    Returns
    -------
    ndarray of shape (u,), int64, sorted

    Notes
    -----
    Uses :func:`streamlev.lewis.sensitivity_upper_bounds` (for p <= 2 the
    minimum of the Lewis bound and ``tau^(p/2)``; for p > 2 ``(sum w)^(p/2-1) w``).
    Size <= d^max(1, p/2) / eps. No false negatives: every key with
    sensitivity >= eps is in the set.
    """
    K = check_matrix_2d(K, caller="universal_set")
    if K.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    Ks, _ = scale_by_max(K)
    ub = sensitivity_upper_bounds(Ks, p, rtol=rtol, tol=LEWIS_TIGHT_TOL)
    return np.flatnonzero(ub >= eps).astype(np.int64)
