"""The selectors compared by :mod:`streamlev.eval`: one score per key, and the keys each one keeps.

Split from :mod:`streamlev.eval` (the harness and metrics) to keep modules small;
the public names are re-exported there.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp

from ._topk import top_k
from ._validation import as_real_array, check_budget, check_scale, check_seed
from .leverage import leverage_scores
from .lewis import lewis_weights
from .selectors import keydiff_scores

__all__ = ["METHODS", "QUERY_AWARE", "FRACTIONS", "EPS", "key_scores", "keys_kept", "select"]

METHODS = ("leverage", "lewis_p1", "knorm_small", "knorm_large", "sketch_leverage", "keydiff", "streaming_llm",
           "random", "oracle")
QUERY_AWARE = frozenset({"oracle"})
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
EPS = (0.1, 0.15, 0.2, 0.3)
N_SINK = 4  # StreamingLLM attention sinks (kvpress StreamingLLMPress default n_sink=4)
SKETCH_DIM = 48  # kvpress LeverageScorePress default sketch_dimension
_JITTER, _JITTER_TRIES = 1e-2, 5  # kvpress LeverageScorePress: first jitter 1e-2, x10 per failure, 5 tries
HEAVY_SLACK = 1e-9  # relative: x^2 entries this close to eps are near-ties of rounding, not misses


# ------------------------------------------------------------------- validation
def _check_method(method, caller):
    if method not in METHODS:
        raise ValueError(f"{caller}: unknown method {method!r}; expected one of {METHODS}.")
    return method


def _check_scale(scale, d, caller):
    """The softmax logit scale, ``1/sqrt(d)`` by default."""
    scale = check_scale(scale, caller=caller)
    return 1.0 / math.sqrt(d) if scale is None else scale


def _check_qkv(Q, K, V, caller, need_q=True):
    K = np.asarray(as_real_array(K, name="K", caller=caller), dtype=np.float64)
    n, d = K.shape
    if Q is None:
        if need_q:
            raise ValueError(f"{caller}: this needs the queries Q of shape (n_q, {d}); got Q=None.")
    else:
        Q = np.asarray(as_real_array(Q, name="Q", caller=caller), dtype=np.float64)
        if Q.shape[1] != d:
            raise ValueError(f"{caller}: Q has shape {Q.shape} but K has shape {K.shape}; both need {d} columns.")
    if V is not None:
        V = np.asarray(as_real_array(V, name="V", caller=caller), dtype=np.float64)
        if V.shape[0] != n:
            raise ValueError(f"{caller}: V has shape {V.shape}; it needs one row per key ({n}).")
    return Q, K, V


def _check_fractions(fractions, caller):
    fr = tuple(float(f) for f in fractions)
    if any(not (0.0 < f <= 1.0) for f in fr):
        raise ValueError(f"{caller}: fractions must lie in (0, 1]; got {fractions!r}.")
    return fr


# ---------------------------------------------------------------------- scores
def _softmax_rows(S, visible=None):
    if visible is not None:
        S = np.where(visible, S, -np.inf)
    S = S - S.max(axis=1, keepdims=True)
    P = np.exp(S)
    return P / P.sum(axis=1, keepdims=True)


def _sketch_leverage(K, seed):
    n, d = K.shape
    phi = np.random.default_rng(seed).standard_normal((d, SKETCH_DIM)) / math.sqrt(SKETCH_DIM)
    X = ((K - K.mean(axis=0)) @ phi).astype(np.float32)  # kvpress casts the sketched keys to float32
    G = X.T @ X
    G = 0.5 * (G + G.T)
    c = _JITTER
    for _ in range(_JITTER_TRIES):
        try:
            L = np.linalg.cholesky(G + np.float32(c) * np.eye(SKETCH_DIM, dtype=np.float32))
            break
        except np.linalg.LinAlgError:
            c = max(1e-8, 10.0 * c)
    else:
        raise np.linalg.LinAlgError("sketch_leverage: Cholesky failed after 5 jitter increases.")
    Y = np.linalg.solve(L, X.T)  # L^{-1} X^T: score_j = ||L^{-1} x_j||^2 = x_j^T (G + cI)^{-1} x_j
    return np.maximum(np.einsum("ij,ij->j", Y, Y), 0.0).astype(np.float64)


def key_scores(method, K, Q=None, *, seed: int = 0, scale=None, causal: bool = False) -> np.ndarray:
    """Score of every key under one selector's rule (higher = keep).

    Parameters
    ----------
    method : str, one of :data:`METHODS`
    K : array_like of shape (n, d)
        Keys of one head (post-projection, as the attention sees them).
    Q : array_like of shape (n_q, d), optional
        Queries; only ``"oracle"`` reads them.
    seed : int, default 0
        Seed of ``"random"`` and of the Gaussian sketch of ``"sketch_leverage"``.
    scale : float, optional
        Softmax scale of the oracle (default ``1/sqrt(d)``).
    causal : bool, default False
        Oracle only: query i sees keys 0..i (needs ``n_q == n``).

    Returns
    -------
    scores : ndarray of shape (n,), float64

    Notes
    -----
    ``"streaming_llm"`` scores ``2n - j`` for the first 4 keys and ``j``
    otherwise, so the top ``b`` are the sinks plus the ``b - 4`` most recent
    keys (the first ``b`` keys when ``b <= 4``). ``"random"`` scores are the
    first n uniforms of ``default_rng(seed)``, so a prefix of K gets a prefix
    of the same scores.
    """
    caller = "key_scores"
    method = _check_method(method, caller)
    seed = check_seed(seed, caller=caller)
    Q, K, _ = _check_qkv(Q, K, None, caller, need_q=method in QUERY_AWARE)
    n, d = K.shape
    if method == "leverage":
        return leverage_scores(K)
    if method == "lewis_p1":
        return np.asarray(lewis_weights(K, 1.0), dtype=np.float64)
    if method in ("knorm_small", "knorm_large"):
        nrm = np.linalg.norm(K, axis=1)
        return -nrm if method == "knorm_small" else nrm
    if method == "sketch_leverage":
        return _sketch_leverage(K, seed)
    if method == "keydiff":
        return keydiff_scores(K)
    if method == "streaming_llm":
        j = np.arange(n, dtype=np.float64)
        return np.where(j < N_SINK, 2.0 * n - j, j)
    if method == "random":
        return np.random.default_rng(seed).random(n)
    # oracle: attention received, summed over the queries (which the other selectors never see)
    S = (Q @ K.T) * _check_scale(scale, d, caller)
    visible = None
    if causal:
        if Q.shape[0] != n:
            raise ValueError(f"{caller}: causal needs one query per key; got Q {Q.shape} and K {K.shape}.")
        visible = np.tri(n, dtype=bool)
    return _softmax_rows(S, visible).sum(axis=0)


def keys_kept(method, K, budget, Q=None, *, seed: int = 0, scale=None, causal: bool = False):
    """The keys one selector keeps at a budget.

    Parameters
    ----------
    method : str, one of :data:`METHODS`
    K : array_like of shape (n, d)
    budget : int >= 1, or (causal only) array of n ints >= 1
        Keys kept (all keys if ``budget >= n``; per prefix when causal).
    Q : array_like of shape (n_q, d), optional (required by ``"oracle"``)
    seed, scale : see :func:`key_scores`
    causal : bool, default False
        Query i sees keys 0..i and its kept set is computed from the prefix
        ``K[:i+1]`` (and ``Q[:i+1]`` for the oracle) alone: the top
        ``min(budget_i, i+1)`` scores of the prefix.

    Returns
    -------
    kept : sorted int64 indices (non-causal), or a scipy.sparse.csr_matrix of
        bool of shape (n, n) whose row i holds the keys kept for query i.

    Notes
    -----
    Each prefix is re-scored from scratch (O(n) score evaluations): simple
    and exact, meant for evaluation, not for serving.
    """
    caller = "keys_kept"
    method = _check_method(method, caller)
    Q, K, _ = _check_qkv(Q, K, None, caller, need_q=method in QUERY_AWARE)
    n = K.shape[0]
    if not causal:
        budget = check_budget(budget, caller=caller)
        return top_k(key_scores(method, K, Q, seed=seed, scale=scale), min(budget, n))
    b = np.broadcast_to(np.asarray(budget), (n,))
    for x in b:
        check_budget(x.item() if isinstance(x, np.generic) else x, caller=caller)
    if method in QUERY_AWARE and Q.shape[0] != n:
        raise ValueError(f"{caller}: causal needs one query per key; got Q {Q.shape} and K {K.shape}.")
    rows = []
    for i in range(n):
        m = i + 1
        if b[i] >= m:
            rows.append(np.arange(m, dtype=np.int64))
            continue
        s = key_scores(method, K[:m], None if Q is None else Q[:m], seed=seed, scale=scale, causal=True)
        rows.append(top_k(s, int(b[i])))
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int64)
    idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(idx.size, dtype=bool), idx, indptr), shape=(n, n))


def select(method, K, budget, Q=None, *, seed: int = 0, scale=None, causal: bool = False):
    """Deprecated alias of :func:`keys_kept` (renamed: :func:`streamlev.selectors.select` is the other ``select``).

    Parameters
    ----------
    method, K, budget, Q, seed, scale, causal
        As in :func:`keys_kept`.

    Returns
    -------
    ndarray or scipy.sparse.csr_matrix
        As :func:`keys_kept`.
    """
    warnings.warn("streamlev.eval.select is deprecated; use streamlev.eval.keys_kept.", DeprecationWarning,
                  stacklevel=2)
    return keys_kept(method, K, budget, Q, seed=seed, scale=scale, causal=causal)
