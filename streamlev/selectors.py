"""Key selectors for softmax attention caches: heuristics built on the exact sketches.

Softmax attention has no query-agnostic universal set (a query ``t * k_j``
makes any distinct key heavy as ``t`` grows), so nothing here carries the
|x|^p guarantee of :class:`~streamlev.LevSketch`. What *is* exact is stated per
function: the scores are exactly the documented quantities, computed in one
streaming, mergeable pass where that is said. Whether a score keeps the
softmax mass is an empirical question; ``docs/softmax_selectors.md`` measures
it on real heads.

Two classes of selectors:

* key-only (no query information): :func:`shift_invariant_leverage`
  (:class:`ShiftInvariantSketch` in streaming form), :func:`key_norm_scores`,
  :func:`keydiff_scores`;
* query-statistics (a :class:`~streamlev.query_sketch.QuerySketch` of the
  queries seen so far, never the future ones): :func:`expected_logit_scores`
  (Gaussian model of the queries; with :func:`rope_rotations` for rotary
  models, whose sketch then summarises pre-RoPE queries) and
  :func:`query_span_leverage`.

:func:`budget_split` and :func:`select` turn scores into a kept set of a given
budget, with attention sinks and a recent window for causal models.
"""

from __future__ import annotations

import numpy as np

from ._constants import DEFAULT_RTOL, NORM_FLOOR, RECENT_FRACTION, SINKS
from ._scaling import scale_by_max
from ._shift_invariant import ShiftInvariantSketch
from ._topk import top_k
from ._validation import check_dim, check_keys, check_matrix_2d
from .leverage import leverage_scores
from .query_sketch import QuerySketch
from .softmax_scores import key_norm, keydiff

__all__ = ["ShiftInvariantSketch", "shift_invariant_leverage", "key_norm_scores", "keydiff_scores",
           "expected_logit_scores", "rope_rotations", "query_span_leverage", "query_span_basis", "budget_split", "select",
           "SINKS", "RECENT_FRACTION"]



# --------------------------------------------------------------------------- translation-invariant leverage
def shift_invariant_leverage(K, *, c: float | None = None, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Offline augmented leverage ``tau_j([K, c1]) = 1/n + tau_j(K - mean)`` of every key.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys.
    c : float, optional
        The constant coordinate; default the RMS key norm (irrelevant except for rounding).
    rtol : float, default=1e-13
        Relative ridge.

    Returns
    -------
    ndarray of shape (n,), float64

    Notes
    -----
    Equals the scores of a :class:`ShiftInvariantSketch` fed with ``K`` (any blocks).
    """
    if np.ndim(K) != 2:
        raise ValueError(f"shift_invariant_leverage: K must be 2-D of shape (n, d); got shape {np.shape(K)}.")
    K = np.asarray(check_keys(K, np.shape(K)[1], caller="shift_invariant_leverage"), dtype=np.float64)
    n = K.shape[0]
    if n == 0:
        return np.zeros(0)
    if c is None:
        c = float(np.sqrt(np.mean(np.sum(K * K, axis=1)))) or 1.0
    return leverage_scores(np.hstack([K, np.full((n, 1), float(c))]), rtol=rtol)


# --------------------------------------------------------------------------- simple key-only scores
def key_norm_scores(K) -> np.ndarray:
    """``||k_j||``: keep the largest keys (a common baseline; kvpress ``KnormPress`` keeps the *smallest*).

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys; NaN or Inf raise ValueError.

    Returns
    -------
    norms : ndarray of shape (n,), float64, the Euclidean norm of each key
    """
    return key_norm(check_matrix_2d(K, caller="key_norm_scores"))


def keydiff_scores(K) -> np.ndarray:
    """KeyDiff (Park et al., arXiv:2504.15364): ``-cos(k_j, mean_l k_l/||k_l||)``; keeps the most distinct keys.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Finite keys (NaN/Inf raise ValueError).

    Returns
    -------
    scores : ndarray of shape (n,), float64 in [-1, 1]

    Notes
    -----
    The one KeyDiff of streamlev (:mod:`streamlev.eval` uses it too). Keys are
    first scaled by a power of two (exact), so the result is invariant to the
    scale of K; norms below ``NORM_FLOOR = 1e-12`` (relative to the largest
    entry) count as ``1e-12``, so a zero key, or a zero anchor, scores 0
    instead of NaN. 1e-12 is the ``eps`` of ``torch.nn.functional.normalize``,
    which kvpress's ``KeyDiffPress`` uses; any key whose relative norm is above
    it gets its exact cosine.
    """
    K, _ = scale_by_max(check_matrix_2d(K, caller="keydiff_scores"))
    norms = np.maximum(np.linalg.norm(K, axis=1), NORM_FLOOR)
    return keydiff(K, (K / norms[:, None]).mean(axis=0), norms)


# --------------------------------------------------------------------------- query-statistics scores
def _check_qs(qs, d, caller):
    if not isinstance(qs, QuerySketch):
        raise TypeError(f"{caller}: expected a QuerySketch of the queries seen so far, got {type(qs).__name__}.")
    if qs.d != d:
        raise ValueError(f"{caller}: the QuerySketch has d={qs.d} but the keys have {d} columns.")
    if qs.n == 0:
        raise ValueError(f"{caller}: the QuerySketch is empty; feed it the queries seen so far first.")


def rope_rotations(d: int, positions, theta: float) -> np.ndarray:
    """Rotary-embedding matrices ``R_t``, Llama "rotate-half" convention.

    Parameters
    ----------
    d : int
        Head dimension (even).
    positions : array_like of int of shape (T,)
        Token positions.
    theta : float
        RoPE base (e.g. 10000).

    Returns
    -------
    ndarray of shape (T, d, d)
        ``R_t q`` is the query of pre-RoPE vector ``q`` at position ``t``: pairs
        ``(i, i + d/2)`` are rotated by the angle ``t * theta**(-2i/d)``.
    """
    d = check_dim(d, caller="rope_rotations")
    if d % 2:
        raise ValueError(f"rope_rotations: d must be even, got {d}.")
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    ang = np.outer(pos, float(theta) ** (-np.arange(0, d, 2) / d))
    cos, sin = np.cos(ang), np.sin(ang)
    h = d // 2
    R = np.zeros((pos.size, d, d))
    i = np.arange(h)
    R[:, i, i] = cos
    R[:, i + h, i + h] = cos
    R[:, i, i + h] = -sin
    R[:, i + h, i] = sin
    return R


def expected_logit_scores(K, qs: QuerySketch, *, scale: float | None = None, covariance: bool = True,
                          rotations=None) -> np.ndarray:
    """Log of the expected unnormalised softmax weight of each key under a Gaussian model of the queries.

    For ``q ~ N(mu, Sigma)`` (mean and covariance from ``qs``) and logits
    ``scale * <q, k>``, ``E exp(scale <q,k>) = exp(scale mu.k + scale^2 k^T Sigma k / 2)``
    (the Gaussian moment generating function); this returns the exponent,
    shape (n,). With ``rotations`` ``R_1..R_T`` (e.g. :func:`rope_rotations`
    of the next positions, ``qs`` then summarising *pre-rotation* queries) the
    query is ``R_t q`` at a position ``t`` drawn uniformly, and the exact
    expectation of that mixture is returned:
    ``log mean_t exp(scale (R_t mu).k + scale^2 k^T R_t Sigma R_t^T k / 2)``.

    Ranking by it ranks keys by expected softmax *numerator*; the softmax
    denominator is common to all keys of one query, so it does not change the
    ranking for a single query and only approximately for the average over
    queries. A heuristic: exact only for the stated Gaussian model.

    Parameters
    ----------
    K : array_like of shape (n, d)
    qs : QuerySketch
        Statistics of the queries seen so far.
    scale : float, default ``1/sqrt(d)``
        The logit scale of the model.
    covariance : bool, default=True
        Include the ``k^T Sigma k / 2`` term (False: ``scale * mu.k`` only).
    rotations : array_like of shape (T, d, d), optional
        Position-dependent linear maps applied to the queries.

    Returns
    -------
    ndarray of shape (n,), float64
    """
    K = np.asarray(check_matrix_2d(K, caller="expected_logit_scores"), dtype=np.float64)
    _check_qs(qs, K.shape[1], "expected_logit_scores")
    s = 1.0 / np.sqrt(K.shape[1]) if scale is None else float(scale)
    mu, C = qs.mean, qs.covariance
    if rotations is None:
        out = s * (K @ mu)
        if covariance:
            out += 0.5 * s * s * np.sum((K @ C) * K, axis=1)
        return out
    R = np.asarray(rotations, dtype=np.float64)
    if R.ndim != 3 or R.shape[1:] != (K.shape[1], K.shape[1]) or R.shape[0] == 0:
        raise ValueError(f"expected_logit_scores: rotations must have shape (T, {K.shape[1]}, {K.shape[1]}); "
                         f"got {R.shape}.")
    KR = np.matmul(K[None], R)  # (T, n, d): <R_t q, k> = <q, R_t^T k>
    logs = s * (KR @ mu)
    if covariance:
        logs += 0.5 * s * s * np.sum((KR @ C) * KR, axis=-1)
    m = logs.max(axis=0)
    return m + np.log(np.mean(np.exp(logs - m), axis=0))


def query_span_basis(qs: QuerySketch, energy: float = 0.99) -> np.ndarray:
    """Orthonormal basis of the effective span of the queries seen.

    Parameters
    ----------
    qs : QuerySketch
        Statistics of the queries seen so far.
    energy : float in (0, 1], default=0.99
        Share of the trace of the second moment the span must capture.

    Returns
    -------
    B : ndarray of shape (d, r), orthonormal columns

    Notes
    -----
    The span of ``r`` leading eigenvectors of the raw second moment ``S``
    where ``r`` is the smallest rank with ``sum_{i<=r} lambda_i >= energy * tr S``
    (``energy=1`` gives the exact numerical span: eigenvalues above ``d u lambda_1``).
    """
    if not isinstance(qs, QuerySketch) or qs.n == 0:
        raise ValueError("query_span_basis: need a non-empty QuerySketch.")
    if not (0.0 < float(energy) <= 1.0):
        raise ValueError(f"query_span_basis: energy must be in (0, 1], got {energy!r}.")
    w, V = np.linalg.eigh(qs.second_moment)
    w, V = np.maximum(w[::-1], 0.0), V[:, ::-1]
    if float(energy) == 1.0:
        r = int(np.sum(w > qs.d * np.finfo(float).eps * w[0]))
    else:
        r = int(np.searchsorted(np.cumsum(w), float(energy) * w.sum()) + 1)
    return V[:, : max(1, min(r, qs.d))]


def query_span_leverage(K, qs: QuerySketch, *, energy: float = 0.99, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Leverage of the keys projected onto the span of the observed queries: the x^2 sensitivity over that span.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Finite keys.
    qs : QuerySketch
        Statistics of the queries seen so far (same d).
    energy : float in (0, 1], default=0.99
        See :func:`query_span_basis`.
    rtol : float, default=1e-13
        Relative ridge of the leverage.

    Returns
    -------
    ndarray of shape (n,), float64 in [0, 1]

    Notes
    -----
    With ``P = B B^T`` the projector onto the query span (:func:`query_span_basis`),

        max_{q in span} <q, k_j>^2 / ||K q||^2 = tau_j(K P) = tau_j(K B),

    because for ``q = B a``: ``<q,k_j> = <a, B^T k_j>`` and ``K q = (K B) a``, so
    the maximum over ``a`` is the leverage of row j of ``K B`` (n x r). Exact
    for queries in the span (``energy=1``); with ``energy<1`` the span is the
    dominant eigenspace of the query second moment (a heuristic truncation).
    """
    K = np.asarray(check_matrix_2d(K, caller="query_span_leverage"), dtype=np.float64)
    _check_qs(qs, K.shape[1], "query_span_leverage")
    return leverage_scores(K @ query_span_basis(qs, energy), rtol=rtol)


# --------------------------------------------------------------------------- budgets
def budget_split(budget: int, n: int, *, causal: bool) -> tuple[int, int]:
    """Number of sink and recent keys in a budget: the documented rule.

    Parameters
    ----------
    budget : int
        Keys kept, >= 0 (clipped to n).
    n : int
        Keys available, >= 0.
    causal : bool
        Causal model (sinks and a recent window) or not.

    Returns
    -------
    sinks, recent : int

    Notes
    -----
    Causal models: ``min(SINKS, budget // 4)`` initial keys (attention sinks,
    StreamingLLM keeps 4) and ``floor(RECENT_FRACTION * budget)`` most recent
    keys; the rest is chosen by score. The fraction is fixed in advance, the
    same for every model, head and data set. Non-causal models: (0, 0).
    """
    if budget < 0 or n < 0:
        raise ValueError(f"budget_split: budget and n must be >= 0, got budget={budget}, n={n}.")
    budget = min(int(budget), int(n))
    if not causal:
        return 0, 0
    sinks = min(SINKS, budget // 4)
    recent = min(int(RECENT_FRACTION * budget), budget - sinks)
    return sinks, recent


def select(scores, budget: int, *, sinks: int = 0, recent: int = 0) -> np.ndarray:
    """Sorted indices of the kept keys: the first ``sinks``, the last ``recent``, the rest by highest score.

    Parameters
    ----------
    scores : array_like of shape (n,)
        One score per key; NaN raises ValueError.
    budget : int
        Keys kept (clipped to n).
    sinks : int, default=0
        Initial keys always kept.
    recent : int, default=0
        Most recent keys always kept; ``sinks + recent <= budget``.

    Returns
    -------
    ndarray of shape (min(budget, n),), int64, increasing

    Notes
    -----
    Ties are broken towards the lower index (stable).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"select: scores must be 1-D, one per key; got shape {s.shape}.")
    if np.isnan(s).any():
        raise ValueError(f"select: scores contain NaN at position(s) {np.flatnonzero(np.isnan(s))[:5].tolist()}; "
                         "a NaN score cannot be ranked. Fix the scores (or the keys they came from).")
    n = s.shape[0]
    budget = min(int(budget), n)
    if budget <= 0:
        return np.zeros(0, np.int64)
    if sinks < 0 or recent < 0 or sinks + recent > budget:
        raise ValueError(f"select: need 0 <= sinks + recent <= budget; got sinks={sinks}, recent={recent}, "
                         f"budget={budget}.")
    forced = np.zeros(n, bool)
    forced[:sinks] = True
    if recent:
        forced[n - recent:] = True
    rest = budget - int(forced.sum())
    cand = np.flatnonzero(~forced)
    return np.sort(np.concatenate([np.flatnonzero(forced), cand[top_k(s[cand], rest)]])).astype(np.int64)


# --------------------------------------------------------------------------- streaming softmax defaults (issue #16)
from .softmax_selector import select_softmax  # noqa: E402  (re-export: the offline entry point of the defaults)

__all__ += ["select_softmax"]
