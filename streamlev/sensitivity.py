"""Exact |x|^p sensitivities (the ground truth for universal sets), for moderate n.

``alpha_j = sup_q |<k_j,q>|^p / ||K q||_p^p = 1 / min{ ||K y||_p^p : <k_j, y> = 1 }``
(paper notes, sections 3.1 and 9.2). This module is an oracle: it solves one
optimisation problem per row, so it is meant for hundreds to a few thousand
rows. For large n use :func:`streamlev.lewis.sensitivity_upper_bounds`.

Every value returned is *attained*: it is the ratio of an explicit query, so
it never exceeds the true sensitivity (up to rounding). For p >= 1 a dual
certificate ``u`` with ``K^T u = k_j`` gives the matching upper bound
``alpha_j <= ||u||_{p'}^p`` (Hoelder), and the two are checked to agree.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
from scipy.optimize import linprog

from ._constants import DEFAULT_RTOL
from ._scaling import scale_by_max
from ._validation import check_choice, check_idx, check_matrix, check_p, check_positive_float

__all__ = ["sensitivities", "SensitivityAccuracyWarning"]

_METHODS = ("auto", "closed-form", "lp", "convex", "enumerate")
# p < 1 (and method="enumerate"): at most this many (r-1)-subsets of rows are enumerated
_MAX_SUBSETS = 200_000
# relative gap between the attained (lower) value and the dual certificate (upper) value
_GAP_TOL = 1e-9


class SensitivityAccuracyWarning(RuntimeWarning):
    """The solver's attained value and its dual certificate differ by more than 1e-9 (relative)."""


def _basis(K: np.ndarray, rtol: float) -> np.ndarray:
    """Orthonormal basis ``B`` (n, r) of col(K), dropping singular values <= rtol ||K||_F.

    alpha(K) = alpha(B) since K = B R with R invertible on the kept directions.
    """
    Ks, _ = scale_by_max(K)  # power-of-two scaling: exact, avoids overflow
    if not Ks.size or not Ks.any():
        return np.zeros((K.shape[0], 0))
    U, s, _ = np.linalg.svd(Ks, full_matrices=False)
    r = int(np.sum(s > rtol * np.linalg.norm(s)))
    return U[:, :r]


def _ratio(B: np.ndarray, j: int, z: np.ndarray, p: float) -> float:
    """Attained value ``|<b_j,z>|^p / ||B z||_p^p`` (0 when Bz = 0)."""
    x = B @ z
    ax = np.abs(x)
    mx = ax.max()
    if not mx > 0:
        return 0.0
    ax = ax / mx  # scale-free, avoids overflow for large p
    return float(ax[j] ** p / np.sum(ax ** p))


def _certificate(B: np.ndarray, b: np.ndarray, u0: np.ndarray, p: float) -> float:
    """Upper bound ``||u||_{p'}^p`` from ``u = t u0 + B (b - t B^T u0)``, which has ``B^T u = b``."""
    v = B.T @ u0
    vv = float(v @ v)
    t = float(b @ v) / vv if vv > 0 else 0.0
    u = t * u0 + B @ (b - t * v)
    au = np.abs(u)
    if p == 1.0:
        return float(au.max())
    q = p / (p - 1.0)
    mx = au.max()
    return float(mx ** p * np.sum((au / mx) ** q) ** (p - 1.0)) if mx > 0 else 0.0


def _lp_p1(B: np.ndarray, j: int) -> tuple[float, float]:
    """p = 1 by the LP ``max lam s.t. B^T u = lam b_j, |u| <= 1`` (its value is min ||Bz||_1)."""
    n, r = B.shape
    b = B[j]
    c = np.zeros(n + 1)
    c[-1] = -1.0
    bounds = [(-1.0, 1.0)] * n + [(None, None)]
    tight = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
    # Scaling column k of B by D_k scales equality row k only: u and lam are unchanged and the
    # multipliers come back as D y. Badly scaled rows (spikes of 1e-8 next to 1e-2) can stall
    # HiGHS, so a failed solve is retried on the equilibrated problem, then with default tolerances.
    norms = np.linalg.norm(B, axis=0)
    D = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 1.0)
    for scale, options in ((np.ones(r), tight), (D, tight), (D, {})):
        A_eq = np.hstack([(B * scale).T, -(b * scale)[:, None]])
        res = linprog(c, A_eq=A_eq, b_eq=np.zeros(r), bounds=bounds, method="highs", options=options)
        if res.status == 0:
            break
    else:
        raise RuntimeError(f"sensitivities: HiGHS failed on row {j} (status {res.status}: {res.message}).")
    lam = -float(res.fun)
    lo = 0.0
    y = getattr(getattr(res, "eqlin", None), "marginals", None)
    if y is not None and np.any(y):
        lo = _ratio(B, j, scale * np.asarray(y, dtype=np.float64), 1.0)  # multipliers = primal minimiser z
    lo = max(lo, _ratio(B, j, b, 1.0))
    hi = _certificate(B, b, res.x[:n] / lam, 1.0) if lam > 0 else 1.0
    return lo, min(hi, 1.0)


def _newton(B: np.ndarray, j: int, p: float, max_iter: int = 200) -> tuple[float, float]:
    """p > 1: Newton with Armijo backtracking on ``min ||x0 + C c||_p^p`` (constraint eliminated)."""
    n, r = B.shape
    b = B[j]
    bn = b / np.linalg.norm(b)
    if r == 1:
        return _ratio(B, j, bn, p), _ratio(B, j, bn, p)
    N = np.linalg.qr(bn[:, None], mode="complete")[0][:, 1:]  # orthonormal basis of b^perp
    z0 = bn / (bn @ b)  # <b, z0> = 1; also the leverage (p = 2) maximiser
    x0 = B @ z0
    C = B @ N

    def f(c):
        return float(np.sum(np.abs(x0 + C @ c) ** p))

    c = np.zeros(r - 1)
    fc = f(c)
    lo = hi = None
    for _ in range(max_iter):
        x = x0 + C @ c
        ax = np.abs(x)
        g_x = ax ** (p - 1.0) * np.sign(x)
        lo = _ratio(B, j, z0 + N @ c, p)
        hi = _certificate(B, b, g_x, p)
        if hi - lo <= _GAP_TOL * lo:
            break
        grad = p * (C.T @ g_x)
        # |x|^{p-2} is unbounded for p < 2 near x = 0: floor it (a preconditioner; the line search keeps descent)
        h = p * (p - 1.0) * np.maximum(ax, 1e-12 * ax.max()) ** (p - 2.0)
        H = C.T @ (h[:, None] * C)
        H[np.diag_indices(r - 1)] += 1e-14 * np.trace(H)
        step = -np.linalg.solve(H, grad)
        slope = float(grad @ step)
        if not slope < 0:
            break
        t = 1.0
        for _ in range(60):
            fn = f(c + t * step)
            if fn <= fc + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            break  # no decrease possible at working precision
        c = c + t * step
        fc = fn
    return lo, hi


def _enumerate(B: np.ndarray, p: float, rows: np.ndarray) -> np.ndarray:
    """Max over vertex queries: null vectors of every (r-1)-subset of rows (exact for p <= 1)."""
    n, r = B.shape
    if r == 1:
        ax = np.abs(B[:, 0]) / np.abs(B[:, 0]).max()
        return ax[rows] ** p / np.sum(ax ** p)
    alpha = np.zeros(n)
    it = itertools.combinations(range(n), r - 1)
    while True:
        chunk = np.array(list(itertools.islice(it, 4096)), dtype=np.int64)
        if chunk.size == 0:
            break
        M = B[chunk]  # (m, r-1, r)
        _, sv, Vt = np.linalg.svd(M, full_matrices=True)
        V = Vt[:, -1, :]  # a null vector of each subset: a valid query in all cases
        X = np.abs(V @ B.T)  # (m, n)
        # for nondegenerate subsets the subset's entries are exactly 0; remove rounding (matters for p < 1)
        nondeg = sv[:, -1] > 1e-8 * sv[:, 0]
        ii = np.repeat(np.flatnonzero(nondeg), r - 1)
        X[ii, chunk[nondeg].ravel()] = 0.0
        X /= X.max(axis=1, keepdims=True)
        Xp = X ** p
        alpha = np.maximum(alpha, (Xp / Xp.sum(axis=1, keepdims=True)).max(axis=0))
    return alpha[rows]


def sensitivities(K, p, *, idx=None, method: str = "auto", rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Exact |x|^p sensitivities ``alpha_j = sup_q |<k_j,q>|^p / ||K q||_p^p``.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys, one per row; real and finite.
    p : float
        ``0 < p < inf``.
    idx : array_like of int, optional
        Rows to compute (default: all). The result has one entry per index.
    method : {"auto", "closed-form", "lp", "convex", "enumerate"}
        "auto" picks "closed-form" for p = 2, "lp" for p = 1, "convex" for
        p > 1 and "enumerate" for p < 1. "closed-form" needs p = 2, "lp"
        needs p = 1, "convex" needs p > 1, "enumerate" needs p <= 1.
    rtol : float, default ``DEFAULT_RTOL``
        Singular values ``<= rtol * ||K||_F`` are treated as zero (numerical
        rank), consistent with the relative ridge elsewhere in streamlev.

    Returns
    -------
    alpha : ndarray of shape (len(idx),) or (n,)
        Values in [0, 1]. Zero rows get 0; a row outside the span of the
        other rows gets 1.

    Raises
    ------
    ValueError, TypeError, IndexError
        Invalid ``K``, ``p``, ``idx`` or ``method`` (messages say what was received).
    NotImplementedError
        ``p < 1`` (or method="enumerate") when more than 200,000 vertex
        queries would be needed.

    Notes
    -----
    Computed on an orthonormal basis ``B`` of col(K) (``alpha(KR) = alpha(K)``).
    Each returned value is the ratio of an explicit query, so it is a lower
    bound on the true supremum up to rounding; for p >= 1 a dual certificate
    (any ``u`` with ``B^T u = b_j`` gives ``alpha_j <= ||u||_{p'}^p``) bounds
    it from above and a :class:`SensitivityAccuracyWarning` is issued if the
    two differ by more than 1e-9 relative.

    * p = 2: ``alpha_j = ||b_j||^2``, the leverage score.
    * p = 1: the LP ``max lambda s.t. B^T u = lambda b_j, |u|_inf <= 1``
      (HiGHS, tolerances 1e-10), whose value is ``min ||B y||_1`` over
      ``<b_j, y> = 1``; the equality multipliers give the maximising query.
    * p > 1: the convex problem with the constraint eliminated, solved by
      Newton's method with backtracking, started at the leverage query.
    * p < 1: nonconvex. ``||x||_p^p`` is concave on each orthant, and each
      orthant piece of ``{y : <b_j,y> = 1}`` is a pointed polyhedron, so the
      minimum is attained at a vertex: a point where r-1 linearly independent
      other rows ``b_l`` have ``<b_l, y> = 0``. We enumerate all
      ``C(n, r-1)`` subsets (one null vector each, shared by all j), which is
      exact but exponential in r; beyond 200,000 subsets we raise
      ``NotImplementedError`` rather than return an unverified local optimum.

    References
    ----------
    LevAttention, arXiv:2410.05462 (sensitivity framework); M. B. Cohen and
    R. Peng, arXiv:1412.0588 (Lewis-weight bounds used to cross-check).

    Examples
    --------
    >>> import numpy as np
    >>> K = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, 0.0]])
    >>> sensitivities(K, 1.0).round(6)
    array([0.333333, 0.666667, 0.666667, 0.      ])
    """
    caller = "sensitivities"
    p = check_p(p, caller=caller)
    K = check_matrix(K, caller=caller)
    method = check_choice(method, _METHODS, name="method", caller=caller)
    rtol = check_positive_float(rtol, name="rtol", caller=caller, upper=1.0)
    n = K.shape[0]
    rows = check_idx(idx, n, caller=caller)
    if method == "auto":
        method = "closed-form" if p == 2.0 else "lp" if p == 1.0 else "convex" if p > 1.0 else "enumerate"
    need = {"closed-form": (p == 2.0, "p = 2"), "lp": (p == 1.0, "p = 1"),
            "convex": (p > 1.0, "p > 1"), "enumerate": (p <= 1.0, "p <= 1")}[method]
    if not need[0]:
        raise ValueError(f"{caller}: method={method!r} requires {need[1]}. Got p={p:g}; use method='auto'.")

    B = _basis(K, rtol)
    r = B.shape[1]
    out = np.zeros(rows.size)
    if rows.size == 0 or r == 0:
        return out
    # Zero rows of K have basis rows at round-off level (not exactly 0), on which the LP is unbounded;
    # rows with leverage below 1e-26 are zero rows or round-off and get sensitivity 0.
    nzb = np.any(K != 0, axis=1) & (np.einsum("ij,ij->i", B, B) > 1e-26)
    if method == "closed-form":
        return np.minimum(np.einsum("ij,ij->i", B[rows], B[rows]), 1.0)
    if method == "enumerate":
        count = math.comb(n, r - 1)
        if count > _MAX_SUBSETS:
            raise NotImplementedError(
                f"{caller}: for p={p:g} < 1 the exact sensitivity is a nonconvex problem, solved by enumerating "
                f"the C(n, r-1) = C({n}, {r - 1}) = {count} vertex queries, more than the limit {_MAX_SUBSETS}. "
                f"Use fewer rows (n) or a lower-rank K, or use streamlev.lewis.sensitivity_upper_bounds "
                f"for valid upper bounds.")
        out = _enumerate(B, p, rows)
        out[~nzb[rows]] = 0.0
        return np.minimum(out, 1.0)
    worst = 0.0
    for i, j in enumerate(rows):
        if not nzb[j]:
            continue
        lo, hi = _lp_p1(B, int(j)) if method == "lp" else _newton(B, int(j), p)
        out[i] = lo
        worst = max(worst, (hi - lo) / lo if lo > 0 else np.inf)
    if worst > _GAP_TOL:
        warnings.warn(f"{caller}: for p={p:g} the attained value and the dual certificate differ by up to "
                      f"{worst:.2e} (relative); the returned values are attained (lower) values.",
                      SensitivityAccuracyWarning, stacklevel=2)
    return np.minimum(out, 1.0)
