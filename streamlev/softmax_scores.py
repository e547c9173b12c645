"""Score rules for softmax key selection, as pure functions on plain arrays.

Everything here is a *heuristic for softmax*: the functions compute exactly
the documented quantities, but no score guarantees a share of softmax mass
(softmax has no query-agnostic universal set). ``docs/softmax_selectors.md``
measures the rules on real heads; :class:`~streamlev.softmax_selector.SoftmaxSelector`
runs them in one streaming, budgeted pass.

Model structure enters through positions: a key or query at position ``p``;
a causal query at ``t`` sees keys ``j <= t``, and with a sliding window of
length ``w`` only keys ``t - w < j <= t`` (the convention of Gemma, Mistral and
``transformers``: the window counts the query's own key).
"""

from __future__ import annotations

import numpy as np

__all__ = ["visible", "observed_attention", "key_norm", "keydiff", "unit_sum", "budget_plan", "expired_before",
           "SINKS", "RECENT_FRACTION"]

SINKS = 4  # initial keys kept by causal budgets (StreamingLLM keeps 4 "attention sinks")
RECENT_FRACTION = 0.25  # share of a causal budget given to the most recent keys (see budget_plan)


def visible(key_pos, query_pos, *, causal: bool, window: int | None) -> np.ndarray | None:
    """Bool (m, n) mask of the keys each query sees, or None when every query sees every key."""
    if not causal:
        return None
    kp = np.asarray(key_pos, np.int64)[None, :]
    qp = np.asarray(query_pos, np.int64)[:, None]
    vis = kp <= qp
    if window is not None:
        vis &= kp > qp - int(window)
    return vis


def observed_attention(K, Q, *, key_pos, query_pos, causal: bool, window: int | None = None,
                       scale: float | None = None, weights=None):
    """Softmax weight each key receives from each observed query, summed; and how many queries saw it.

    Parameters
    ----------
    K : ndarray of shape (n, d)
        Keys (post-RoPE, as cached), at positions ``key_pos`` (n,).
    Q : ndarray of shape (m, d) or (g, m, d)
        Queries at positions ``query_pos`` (m,); with (g, m, d) the queries of
        the g query heads that read these keys (grouped-query attention).
    causal, window : model structure (see the module docstring).
    scale : float, default ``1/sqrt(d)``
        Logit scale.
    weights : ndarray of shape (m,), optional
        Weight of each query position (default 1): sums and counts are weighted.

    Returns
    -------
    sums : ndarray of shape (n,)
        ``sum_{h, i : i sees j} softmax_j(scale * q_hi . k)`` over the keys
        each query sees *among these n* (rows with no visible key add nothing).
    counts : ndarray of shape (n,)
        Number of (head, query) pairs that saw key j.

    Notes
    -----
    ``sums / counts`` is the mean attention a key received from the queries that
    could attend to it: dividing by the count removes the causal bias towards
    early keys (which more queries see). Pooling over the g heads is the mean
    (one count per head and query), chosen by measurement over max pooling
    and per-head softmax averaging (``docs/softmax_selectors.md``).
    """
    K = np.asarray(K, np.float64)
    Q = np.asarray(Q, np.float64)
    if Q.ndim == 2:
        Q = Q[None]
    n, d = K.shape
    s = 1.0 / np.sqrt(d) if scale is None else float(scale)
    if n == 0 or Q.shape[1] == 0:
        return np.zeros(n), np.zeros(n)
    vis = visible(key_pos, query_pos, causal=causal, window=window)
    S = np.einsum("hid,jd->hij", Q, K) * s
    if vis is not None:
        S = np.where(vis[None], S, -np.inf)
    top = S.max(axis=-1, keepdims=True)
    ok = np.isfinite(top)  # a query that sees none of these keys contributes nothing
    P = np.exp(S - np.where(ok, top, 0.0))
    P /= np.where(ok, P.sum(axis=-1, keepdims=True), 1.0)
    P = np.where(ok, P, 0.0)
    w = np.ones(Q.shape[1]) if weights is None else np.asarray(weights, np.float64)
    seen = ok[..., 0] * w[None, :]  # (g, m): weight of each (head, query) that sees at least one key
    counts = np.einsum("hi,ij->j", seen, vis) if vis is not None else np.full(n, float(seen.sum()))
    return np.einsum("hij,i->j", P, w), counts.astype(np.float64)


def key_norm(K) -> np.ndarray:
    """``||k_j||`` (higher = keep), shape (n,)."""
    return np.linalg.norm(np.asarray(K, np.float64), axis=1)


def unit_sum(K) -> np.ndarray:
    """``sum_j k_j / ||k_j||`` (zero keys add nothing), shape (d,): the running statistic of :func:`keydiff`."""
    K = np.asarray(K, np.float64)
    nrm = np.linalg.norm(K, axis=1)
    return (K[nrm > 0] / nrm[nrm > 0, None]).sum(axis=0)


def keydiff(K, anchor_sum) -> np.ndarray:
    """KeyDiff (Park et al. 2025) against a given anchor: ``-cos(k_j, anchor)``, shape (n,).

    With ``anchor_sum = unit_sum(all keys)`` this is kvpress ``KeyDiffPress``'s
    score; a streaming selector passes the running sum over every key seen.
    """
    K = np.asarray(K, np.float64)
    a = np.asarray(anchor_sum, np.float64)
    na = float(np.linalg.norm(a))
    nrm = np.linalg.norm(K, axis=1)
    if na == 0.0:
        return np.zeros(K.shape[0])
    return -(K @ a) / (np.maximum(nrm, 1e-300) * na)


def budget_plan(budget: int, *, causal: bool, recent_fraction: float = RECENT_FRACTION,
                sinks: int = SINKS) -> tuple[int, int]:
    """Sinks and recent keys inside a budget: ``(min(sinks, budget // 4), floor(recent_fraction * budget))`` if causal.

    Bidirectional models get ``(0, 0)``: they have no "initial" or "recent" keys.
    """
    if not causal:
        return 0, 0
    s = min(int(sinks), int(budget) // 4)
    return s, min(int(recent_fraction * budget), int(budget) - s)


def expired_before(n: int, window: int | None) -> int:
    """Keys with position below this are outside the window of every query at position >= n (0 if no window)."""
    return 0 if window is None else max(0, int(n) - int(window) + 1)
