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

from ._constants import NORM_FLOOR, RECENT_FRACTION, SINKS

__all__ = ["rope_shift", "observed_attention", "key_norm", "keydiff", "unit_sum", "budget_plan", "expired_before"]



def rope_shift(Q, delta, theta: float) -> np.ndarray:
    """Move post-RoPE vectors by ``delta`` positions: ``R_delta q`` (rotate-half RoPE with base ``theta``).

    Parameters
    ----------
    Q : array_like of shape (..., m, d), d even
        Post-RoPE queries (or keys).
    delta : array_like of shape (m,)
        Positions to move each row by (may be negative).
    theta : float
        RoPE base: pair ``(k, k + d/2)`` turns by ``delta * theta^(-2k/d)``.

    Returns
    -------
    ndarray of the shape of Q, float64

    Notes
    -----
    RoPE rotations compose (``R_a R_b = R_(a+b)``), so a query cached at position
    ``i`` and moved by ``t - i`` is exactly that query's content at position ``t``.
    """
    Q = np.asarray(Q, np.float64)
    d = Q.shape[-1]
    ang = np.outer(np.asarray(delta, np.float64), float(theta) ** (-np.arange(0, d, 2) / d))
    ang = np.concatenate([ang, ang], axis=1)
    rot = np.concatenate([-Q[..., d // 2:], Q[..., : d // 2]], axis=-1)
    return Q * np.cos(ang) + rot * np.sin(ang)


def observed_attention(K, key_pos, Q, query_pos, *, next_pos: int, causal: bool, window: int | None = None,
                       rope_theta: float | None = None, half_life: float | None = None,
                       scale: float | None = None, pool: str = "mean") -> np.ndarray:
    """Mean softmax weight of each key under the observed queries, moved to the next position.

    Parameters
    ----------
    K : ndarray of shape (n, d)
        Keys (post-RoPE, as cached).
    key_pos : array_like of shape (n,)
        Their positions.
    Q : ndarray of shape (m, d) or (g, m, d)
        Observed queries (post-RoPE); (g, m, d) for the g query heads that read
        these keys (grouped-query attention).
    query_pos : array_like of shape (m,)
        Their positions.
    next_pos : int
        Position of the next query (causal models), where the queries are moved.
    causal : bool
        Causal model (see the module docstring).
    window : int or None
        Sliding-window length (causal only).
    rope_theta : float or None
        RoPE base (rotate-half convention): causal queries are moved by
        :func:`rope_shift` to ``next_pos``; None: no rotary embedding (no move).
    half_life : float or None
        Causal only: a query ``a`` positions older than the newest counts
        ``2^(-a / half_life)``.
    scale : float, default ``1/sqrt(d)``
    pool : {"mean", "max"}, default "mean"
        How the g heads' scores combine (the default is the documented rule;
        "max" is kept to measure the alternative).

    Returns
    -------
    scores : ndarray of shape (n,)
        ``sum_{h,i} w_i softmax_j(scale * q'_hi . k) / (g sum_i w_i)`` over the
        keys a query at ``next_pos`` sees (causal: ``j < next_pos`` and inside
        the window; bidirectional: all), 0 for the others. Pooling over the g
        heads is the mean (chosen by measurement, ``docs/softmax_selectors.md``).

    Notes
    -----
    Moving a query to the next position asks "which keys would this query's
    content attend to if it came next": the relative RoPE distances become
    those a future query has. On SmolLM2 this beats the attention the queries
    paid at their own positions (98.3% vs 97.0% of the oracle at N/16).
    """
    K = np.asarray(K, np.float64)
    Q = np.asarray(Q, np.float64)
    if Q.ndim == 2:
        Q = Q[None]
    n, d = K.shape
    g, m = Q.shape[0], Q.shape[1]
    out = np.zeros(n)
    if n == 0 or m == 0:
        return out
    s = 1.0 / np.sqrt(d) if scale is None else float(scale)
    qpos = np.asarray(query_pos, np.float64)
    w = np.ones(m) if (half_life is None or not causal) else np.exp2(-(qpos.max() - qpos) / float(half_life))
    vis = np.ones(n, bool)
    if causal:
        kp = np.asarray(key_pos, np.int64)
        vis = kp < int(next_pos)
        if window is not None:
            vis &= kp > int(next_pos) - int(window)
        if rope_theta is not None:
            Q = rope_shift(Q, int(next_pos) - qpos, rope_theta)
    if not vis.any():
        return out
    S = np.einsum("hid,jd->hij", Q, K[vis]) * s
    P = np.exp(S - S.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    per_head = np.einsum("hij,i->hj", P, w) / w.sum()
    out[vis] = per_head.mean(axis=0) if pool == "mean" else per_head.max(axis=0)
    return out


def key_norm(K) -> np.ndarray:
    """Norm of every key.

    Parameters
    ----------
    K : array_like of shape (n, d)

    Returns
    -------
    ndarray of shape (n,)
        ``||k_j||``.
    """
    return np.linalg.norm(np.asarray(K, np.float64), axis=1)


def unit_sum(K) -> np.ndarray:
    """Sum of the unit keys: the running statistic of :func:`keydiff`.

    Parameters
    ----------
    K : array_like of shape (n, d)

    Returns
    -------
    ndarray of shape (d,)
        ``sum_j k_j / ||k_j||`` (zero keys add nothing).
    """
    K = np.asarray(K, np.float64)
    nrm = np.linalg.norm(K, axis=1)
    return (K[nrm > 0] / nrm[nrm > 0, None]).sum(axis=0)


def keydiff(K, anchor_sum, norms=None) -> np.ndarray:
    """KeyDiff (Park et al. 2025) against a given anchor: ``-cos(k_j, anchor)``.

    Parameters
    ----------
    K : array_like of shape (n, d)
    anchor_sum : array_like of shape (d,)
        With ``unit_sum(all keys)`` this is kvpress ``KeyDiffPress``'s score; a
        streaming selector passes the running sum over every key seen.
    norms : ndarray of shape (n,), optional
        ``||k_j||`` when the caller has them already.

    Returns
    -------
    ndarray of shape (n,)
        Higher = more distinct from the anchor direction (0 for a zero key or anchor).
    """
    K = np.asarray(K, np.float64)
    a = np.asarray(anchor_sum, np.float64)
    na = float(np.linalg.norm(a))
    if na == 0.0:
        return np.zeros(K.shape[0])
    nrm = np.linalg.norm(K, axis=1) if norms is None else norms
    # the one KeyDiff formula (selectors.keydiff_scores calls this): both norms floored at NORM_FLOOR
    return -(K @ a) / (np.maximum(nrm, NORM_FLOOR) * max(na, NORM_FLOOR))


def budget_plan(budget: int, *, causal: bool, recent_fraction: float = RECENT_FRACTION,
                sinks: int = SINKS) -> tuple[int, int]:
    """Sinks and recent keys inside a budget.

    Parameters
    ----------
    budget : int
    causal : bool
        Bidirectional models get ``(0, 0)``: they have no "initial" or "recent" keys.
    recent_fraction : float, default 0.25
    sinks : int, default 4

    Returns
    -------
    (int, int)
        ``(min(sinks, budget // 4), min(floor(recent_fraction * budget), budget - sinks))`` if causal.
    """
    if not causal:
        return 0, 0
    s = min(int(sinks), int(budget) // 4)
    return s, min(int(recent_fraction * budget), int(budget) - s)


def expired_before(n: int, window: int | None) -> int:
    """First position still inside the window of a query at position ``n`` (and of every later one).

    Parameters
    ----------
    n : int
        Position of the next query.
    window : int or None
        Sliding-window length (a query at t sees keys ``t-window < j <= t``).

    Returns
    -------
    int
        ``max(0, n - window + 1)``, or 0 without a window: keys below it can be dropped.
    """
    return 0 if window is None else max(0, int(n) - int(window) + 1)
