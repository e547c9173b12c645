"""Attention through the universal set: every heavy entry from a sketch, and LevAttention layers.

* :func:`heavy_attention`: every (query, key) pair with x^2 attention share
  ``>= eps`` over *all* keys a :class:`~streamlev.LevSketch` has seen, using
  only the sketch (its d x d factor and its retained keys).
* :func:`select_keys`: the keys LevAttention restricts attention to: leverage
  ``>= eps`` (threshold mode) or the ``budget`` keys of largest leverage
  (budget mode), per query position when ``causal``.
* :func:`lev_attention`: attention output computed over the selected keys only,
  with the semantics of full attention otherwise.
* :func:`restriction_cost`: what restricting to a kept set costs, per query
  (attention mass left out, and the largest output error), to choose eps or a
  budget on one's own data.

Softmax has no universal set: for a key k_j that is not a positive multiple of
another key, the query q = t k_j gives it softmax share -> 1 as t -> inf, so
every such key is heavy for some query. Leverage is then only a ranking
heuristic (what the paper's ViT experiments used); nothing here claims a
guarantee for softmax.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from . import _factor
from ._constants import BLOCK_ELEMS, DEFAULT_RTOL
from ._kernels.rank_one import givens_add_row
from ._scaling import pow2_exponent, scale_by_max
from ._topk import top_k
from ._validation import as_real_array, check_attention_p, check_bool, check_budget, check_eps, like_input
from .leverage import leverage_scores
from .lp import LpSketch
from .sketch import LevSketch

__all__ = ["heavy_attention", "select_keys", "lev_attention", "restriction_cost", "RestrictionCost"]



# ----------------------------------------------------------------- heavy entries
def heavy_attention(sketch, Q, eps: float | None = None, *, id_map: bool = False):
    """Every (i, j) with x^2 attention ``A_ij = <q_i,k_j>^2 / ||K q_i||^2 >= eps`` over all keys seen.

    Parameters
    ----------
    sketch : LevSketch or LpSketch built with normalizer=True
        Sketch of the keys K (any number n of keys; only its state is used).
    Q : array_like of shape (n_q, d) or (d,)
        Queries; float16/32/64, integers, or a CPU torch tensor.
    eps : float, optional
        Threshold, ``>= sketch.eps`` (default ``sketch.eps``).
    id_map : bool, default=False
        If False, return a CSR matrix whose column j is the key with id j.
        If True, return ``(A, ids)``: A has one column per retained key and
        ``ids`` (sorted int64) names them (use this for negative or huge ids).

    Returns
    -------
    A : scipy.sparse.csr_matrix of float64
        Shape (n_q, max(n, max retained id + 1)) (id_map=False) or
        (n_q, num_retained) (id_map=True); holds exactly the entries ``>= eps``
        with their attention share as value, column indices sorted.
    ids : ndarray of int64, only when ``id_map`` is True

    Notes
    -----
    Exact for p = 2: the row normaliser ``||K q||^2 = ||R q||^2`` comes from
    the sketch's factor (R^T R = K^T K), and any key with ``A_ij >= eps`` has
    leverage ``tau_j >= A_ij >= eps``, so it is retained. The set equals the
    brute-force ``{(i, j) : A_ij >= eps}`` except for entries within float64
    rounding of eps (relative error about ``u d ||q||^2 ||K||^2 / ||K q||^2``;
    near 1e-13 for ordinary queries, larger for queries almost orthogonal to
    every key, where brute force is equally uncertain).

    Scale safety: each query is scaled by a power of two (A is invariant to
    the scale of q), then by the power of two nearest ``max|R q|``, so no
    square overflows or underflows to a wrong decision. Rows with ``K q = 0``
    are empty (as in :func:`streamlev.reference.attention_x2`).

    Cost: ``O(n_q (r d + d^2))`` time for r candidate keys (``r <=
    d / eps``), processed in query blocks of bounded memory; no key outside
    the sketch is read.

    General p (an :class:`~streamlev.LpSketch` built with ``normalizer=True``):
    ``A_ij = |<q_i,k_j>|^p / ||K q_i||_p^p``. Candidates are the retained keys
    with sensitivity bound >= eps (every key with ``A_ij >= eps`` for some i
    is one). The numerator is exact; the denominator is the embedding's
    estimate ``est_i`` (:class:`~streamlev.embedding.LpEmbedding`), and the
    reported value is ``|<q_i,k_j>|^p / est_i``. Entries are included
    conservatively: (i, j) is reported when ``|<q_i,k_j>|^p >= eps (1 -
    delta) est_i``. Whenever ``est_i`` is within ``(1 +- delta)`` of
    ``||K q_i||_p^p`` this has no false negatives, every reported entry has
    true ``A_ij >= eps (1 - delta)^2``, and the reported value is within
    a factor ``[1/(1+delta), 1/(1-delta)]`` of the true ``A_ij``. The
    probability that the estimate leaves that band is the embedding's failure
    probability (see ``LpEmbedding.error_bound``: not proven for the default
    coreset size, measured in tests/test_embedding.py). Cost ``O(n_q (r + N)
    d)`` for N embedding rows.
    """
    p = getattr(sketch, "p", None)
    if isinstance(sketch, LpSketch) and sketch.normalizer is not None:
        return sketch.heavy_attention(Q, eps, id_map=id_map)
    if p is not None and not isinstance(sketch, LevSketch) and float(p) != 2.0:
        raise NotImplementedError(
            f"heavy_attention: p={p!r} is not supported yet. For p != 2 the row normaliser "
            "sum_l |<q,k_l>|^p needs a subspace embedding of all keys: build the sketch with "
            "LpSketch(d, eps, p=..., normalizer=True), or use a LevSketch (p = 2).")
    if not isinstance(sketch, LevSketch):
        raise TypeError(f"heavy_attention: expected a LevSketch, got {type(sketch).__name__}.")
    return sketch.heavy_attention(Q, eps, id_map=id_map)




# ------------------------------------------------------------------- key selection
def _check_mode(eps, budget, caller):
    if (eps is None) == (budget is None):
        raise ValueError(f"{caller}: pass exactly one of eps= (threshold mode: keys with leverage >= eps) or "
                         f"budget= (the budget keys of largest leverage). Got eps={eps!r}, budget={budget!r}.")
    if eps is not None:
        return check_eps(eps, caller=caller), None
    return None, check_budget(budget, caller=caller)


def select_keys(K, *, eps: float | None = None, budget: int | None = None, causal: bool = False,
                rtol: float = DEFAULT_RTOL):
    """The keys LevAttention keeps: leverage >= eps, or the ``budget`` keys of largest leverage.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys (numpy or CPU torch; any real dtype).
    eps : float in (0, 1], optional
        Threshold mode. Exactly one of ``eps`` and ``budget`` must be given.
    budget : int >= 1, optional
        Budget mode: the ``budget`` keys of largest leverage (all keys if
        ``budget >= n``); ties go to the earlier key.
    causal : bool, default=False
        If True, query i may see keys 0..i only, and its kept set is computed
        from those keys alone (leverage w.r.t. the prefix K[:i+1]).
    rtol : float, default=1e-13
        Relative ridge of the leverage definition (see :mod:`streamlev.reference`).

    Returns
    -------
    kept : ndarray of int64 (sorted ids), or, when ``causal``, a
        scipy.sparse.csr_matrix of bool, shape (n, n): row i holds the keys
        kept for query i (a subset of 0..i).

    Notes
    -----
    For x^2 attention, threshold mode keeps every key that any query can give
    share >= eps (the universal set; for causal, per prefix). Budget mode and
    softmax attention carry no such guarantee.

    Causal cost: one pass over the keys maintaining the triangular factor of
    the prefix (Givens rotations, O(d^2) per key). Leverage never increases as
    keys arrive, so in threshold mode a key that drops below eps is never
    scored again; the keys still >= eps (at most d/eps) are re-scored exactly
    at every position: O(n (d^2 + r d^2)) time for r such keys, O(n r)
    memory for the result. In budget mode the last exact score of each key is
    an upper bound of its current one, so only keys whose bound reaches into
    the top ``budget`` are re-scored (at least ``budget`` per position).
    """
    caller = "select_keys"
    eps, budget = _check_mode(eps, budget, caller)
    causal = check_bool(causal, name="causal", caller=caller)
    K = as_real_array(K, name="K", caller=caller)
    n, d = K.shape
    if not causal:
        if budget is not None and budget >= n:
            return np.arange(n, dtype=np.int64)
        tau = leverage_scores(K, rtol=rtol)
        return np.flatnonzero(tau >= eps).astype(np.int64) if eps is not None else top_k(tau, budget)
    return _causal_sets(scale_by_max(K)[0], eps, budget, rtol)


def _causal_sets(Ks, eps, budget, rtol):
    n, d = Ks.shape
    R = np.zeros((d, d))
    x = np.empty(d)
    kept = []
    cand = np.zeros(0, dtype=np.int64)
    ub = np.full(n, np.inf)  # last exact prefix leverage: an upper bound from then on
    for i in range(n):
        x[:] = Ks[i]
        givens_add_row(R, x)  # R^T R = K[:i+1]^T K[:i+1]
        m = i + 1
        if eps is not None:
            cand = np.append(cand, i)
            tau = _factor.score_rows(R, Ks[cand], rtol)
            cand = cand[tau >= eps]
            kept.append(cand)
            continue
        if m <= budget:
            kept.append(np.arange(m, dtype=np.int64))
            continue
        kappa = _factor.cond_estimate(R)
        fresh = np.zeros(m, dtype=bool)
        pos = np.arange(m)
        while True:
            order = np.lexsort((pos, -ub[:m]))
            stale = order[: 2 * budget][~fresh[order[: 2 * budget]]]
            if fresh[order[:budget]].all():
                break
            ub[stale] = _factor.score_rows(R, Ks[stale], rtol, kappa=kappa)
            fresh[stale] = True
        kept.append(np.sort(order[:budget]).astype(np.int64))
    indptr = np.concatenate([[0], np.cumsum([k.size for k in kept])]).astype(np.int64)
    indices = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(indices.size, dtype=bool), indices, indptr), shape=(n, n))


# ----------------------------------------------------------------------- attention
def _weights(S, visible, p, scale):
    """Unnormalised attention weights of scores S over the visible entries (others 0); scale-safe."""
    if p == "softmax":
        Z = S * scale
        Z[~visible] = -np.inf
        mx = np.max(Z, axis=1, keepdims=True)
        mx[~np.isfinite(mx)] = 0.0
        W = np.exp(Z - mx)
    else:
        W = np.abs(S)
        W[~visible] = 0.0
        mx = np.max(W, axis=1, keepdims=True)
        mx[mx == 0] = 1.0
        W /= mx  # row max 1: |x|^p neither overflows nor underflows the normaliser
        W **= p
    return W


def _normalise(W):
    z = W.sum(axis=1, keepdims=True)
    return np.divide(W, z, out=np.zeros_like(W), where=z > 0)


def _blocks(n_q, n, causal, kept):
    """Yield (rows slice, key columns, visible mask or None) per query block."""
    width = n if kept is None or sp.issparse(kept) else kept.size
    step = max(1, min(n_q, BLOCK_ELEMS // max(width, 1)))
    for s in range(0, n_q, step):
        t = min(n_q, s + step)
        if kept is None or not sp.issparse(kept):
            cols = np.arange(n if not causal else t) if kept is None else kept
            if causal:
                if kept is not None:
                    cols = cols[cols < t]
                vis = cols[None, :] <= np.arange(s, t)[:, None]
            else:
                vis = np.ones((t - s, cols.size), dtype=bool)
            yield slice(s, t), cols, vis
            continue
        lo, hi = kept.indptr[s], kept.indptr[t]
        cols = np.unique(kept.indices[lo:hi])
        vis = np.zeros((t - s, cols.size), dtype=bool)
        rows = np.repeat(np.arange(t - s), np.diff(kept.indptr[s : t + 1]))
        vis[rows, np.searchsorted(cols, kept.indices[lo:hi])] = True
        yield slice(s, t), cols, vis


def _prep_qk(Q, K, p):
    """float64 copies; for |x|^p, scale each query and K by powers of two (A is invariant to both)."""
    Q = Q.astype(np.float64)
    K = K.astype(np.float64)
    if p != "softmax":
        Q = np.ldexp(Q, -pow2_exponent(np.max(np.abs(Q), axis=1, initial=0.0))[:, None])
        K = scale_by_max(K)[0]
    return Q, K


def _attend(Q, K, V, kept, p, scale, causal):
    n_q = Q.shape[0]
    out = np.zeros((n_q, V.shape[1]))
    Q, K = _prep_qk(Q, K, p)
    for rows, cols, vis in _blocks(n_q, K.shape[0], causal, kept):
        if cols.size == 0:
            continue
        W = _normalise(_weights(Q[rows] @ K[cols].T, vis, p, scale))
        out[rows] = W @ V[cols]
    return out


def _check_qkv(Q, K, V, caller, lead=False):
    nd = (2, 3, 4, 5, 6) if lead else (2,)
    Qa = as_real_array(Q, name="Q", caller=caller, ndim=nd)
    Ka = as_real_array(K, name="K", caller=caller, ndim=nd)
    Va = as_real_array(V, name="V", caller=caller, ndim=nd)
    if not (Qa.ndim == Ka.ndim == Va.ndim) or Qa.shape[:-2] != Ka.shape[:-2] or Ka.shape[:-2] != Va.shape[:-2]:
        raise ValueError(f"{caller}: Q, K and V must share their leading (batch/head) dimensions: got shapes "
                         f"{Qa.shape}, {Ka.shape}, {Va.shape}; expected (..., n_q, d), (..., n, d), (..., n, dv).")
    if Qa.shape[-1] != Ka.shape[-1]:
        raise ValueError(f"{caller}: Q has d={Qa.shape[-1]} but K has d={Ka.shape[-1]}; they must match.")
    if Ka.shape[-2] != Va.shape[-2]:
        raise ValueError(f"{caller}: K has {Ka.shape[-2]} keys but V has {Va.shape[-2]} rows; one value per key.")
    return Qa, Ka, Va


def lev_attention(Q, K, V, *, eps: float | None = None, budget: int | None = None, p=2.0, scale=None,
                  causal: bool = False, rtol: float = DEFAULT_RTOL):
    """Attention output over the kept keys only (LevAttention), full-attention semantics otherwise.

    Parameters
    ----------
    Q : array_like of shape (..., n_q, d)
    K : array_like of shape (..., n, d)
    V : array_like of shape (..., n, dv)
        numpy arrays (float16/32/64, ints) or CPU torch tensors (bfloat16
        included); leading (batch, head) dimensions must match and each slice
        is handled independently (its own kept set).
    eps : float in (0, 1], optional
        Threshold mode: keep keys with leverage >= eps (the universal set for
        x^2 attention). Exactly one of ``eps``, ``budget``.
    budget : int >= 1, optional
        Budget mode: keep the ``budget`` keys of largest leverage (the paper's
        ViT experiments used 32).
    p : float > 0 or "softmax", default=2.0
        ``A = rownorm(|Q K^T|^p)`` or ``softmax(scale * Q K^T)``. Threshold
        mode needs p = 2 or softmax (the p != 2 universal set is not leverage).
    scale : float, optional
        Softmax temperature, default ``1 / sqrt(d)``; softmax only.
    causal : bool, default=False
        Query i sees keys 0..i only (requires n_q == n), and its kept set is
        computed from keys 0..i alone (see :func:`select_keys`).
    rtol : float, default=1e-13
        Relative ridge of the leverage definition.

    Returns
    -------
    out : ndarray of shape (..., n_q, dv), float64 (a torch tensor of Q's
        dtype if Q is torch).

    Notes
    -----
    With every key kept (tiny eps, or ``budget >= n``) the result is full
    attention. Threshold mode with p = 2 keeps every key that can receive
    share >= eps from any query, so each row loses at most the mass of the
    keys below eps; it is not a bound on the output error (many small entries
    can add up): measure it with :func:`restriction_cost`. A query whose kept
    keys all score 0 (|x|^p) or with no kept key gets an all-zero row.
    Softmax has no universal set (q = t k_j makes any distinct key heavy), so
    for softmax leverage is a ranking heuristic without guarantee.

    Cost: selection as in :func:`select_keys`; attention O(n_q r (d + dv))
    for r kept keys (causal: r is the union of kept sets over a query block).
    """
    caller = "lev_attention"
    eps, budget = _check_mode(eps, budget, caller)
    p, scale = check_attention_p(p, scale, caller=caller)
    causal = check_bool(causal, name="causal", caller=caller)
    if eps is not None and p not in ("softmax", 2.0):
        raise NotImplementedError(f"{caller}: threshold mode needs the universal set for p={p}, which is not "
                                  "leverage (it needs the general-p sketch, not available yet); use p=2, "
                                  "p='softmax' or budget mode.")
    Qa, Ka, Va = _check_qkv(Q, K, V, caller, lead=True)
    if causal and Qa.shape[-2] != Ka.shape[-2]:
        raise ValueError(f"{caller}: causal attention needs one query per key position (n_q == n); got "
                         f"n_q={Qa.shape[-2]}, n={Ka.shape[-2]}.")
    if p == "softmax" and scale is None:
        scale = 1.0 / np.sqrt(Qa.shape[-1])
    lead = Qa.shape[:-2]
    out = np.zeros(lead + (Qa.shape[-2], Va.shape[-1]))
    for idx in np.ndindex(*lead):
        kept = select_keys(Ka[idx], eps=eps, budget=budget, causal=causal, rtol=rtol)
        out[idx] = _attend(Qa[idx], Ka[idx], Va[idx].astype(np.float64), kept, p, scale, causal)
    return like_input(out, Q)


class RestrictionCost(NamedTuple):
    """Per-query cost of restricting attention to a kept set (see :func:`restriction_cost`)."""

    mass_outside: np.ndarray  #: (n_q,) full-attention share of the visible keys that were not kept
    max_abs_error: np.ndarray  #: (n_q,) max over output coordinates of |restricted - full|


def _check_kept(kept, n_q, n, causal, caller):
    if sp.issparse(kept):
        M = sp.csr_matrix(kept, dtype=bool)
    else:
        arr = np.asarray(kept)
        if arr.ndim == 1:
            if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= n):
                raise ValueError(f"{caller}: kept as a 1-D array must hold key indices in [0, {n}); got dtype "
                                 f"{arr.dtype}, range [{arr.min()}, {arr.max()}].")
            ids = np.unique(arr.astype(np.int64))
            if not causal:
                return ids
            M = sp.csr_matrix((np.ones(ids.size * n_q, bool), np.tile(ids, n_q),
                               np.arange(n_q + 1) * ids.size), shape=(n_q, n))
        elif arr.ndim == 2 and arr.dtype == bool:
            M = sp.csr_matrix(arr)
        else:
            raise TypeError(f"{caller}: kept must be 1-D key indices, an (n_q, n) bool mask, or a scipy sparse "
                            f"matrix (as from select_keys); got an array of dtype {arr.dtype}, shape {arr.shape}.")
    if M.shape != (n_q, n):
        raise ValueError(f"{caller}: a per-query kept mask must have shape (n_q, n) = ({n_q}, {n}); got {M.shape}.")
    M.eliminate_zeros()
    M.sort_indices()
    if causal:  # a query never sees later keys, kept or not
        rows = np.repeat(np.arange(n_q), np.diff(M.indptr))
        ok = M.indices <= rows
        M = sp.csr_matrix((np.ones(int(ok.sum()), bool), (rows[ok], M.indices[ok])), shape=(n_q, n))
    return M


def restriction_cost(Q, K, V, kept, *, p=2.0, scale=None, causal: bool = False) -> RestrictionCost:
    """Attention mass outside ``kept`` and the output error of restricting to it, per query.

    Parameters
    ----------
    Q : array_like of shape (n_q, d)
    K : array_like of shape (n, d)
    V : array_like of shape (n, dv)
    kept : 1-D int array of key indices (the same keys for every query), or
        an (n_q, n) bool mask / scipy sparse matrix (per query, e.g. from
        ``select_keys(K, ..., causal=True)``).
    p : float > 0 or "softmax", default=2.0
    scale : float, optional
        Softmax temperature, default ``1 / sqrt(d)``.
    causal : bool, default=False
        Query i sees keys 0..i only (requires n_q == n); kept keys after i are ignored.

    Returns
    -------
    RestrictionCost
        ``mass_outside`` (n_q,): sum of full-attention shares of the visible
        keys not kept (summed directly, not as 1 - kept mass, so small values
        are accurate); ``max_abs_error`` (n_q,): ``max_k |out_kept - out_full|``
        where ``out_kept`` is exactly what :func:`lev_attention` returns for
        that kept set.

    Notes
    -----
    Computes full attention: O(n_q n (d + dv)) time, in query blocks of
    bounded memory. Use it on a sample of queries to choose eps or a budget.
    """
    caller = "restriction_cost"
    p, scale = check_attention_p(p, scale, caller=caller)
    causal = check_bool(causal, name="causal", caller=caller)
    Qa, Ka, Va = _check_qkv(Q, K, V, caller)
    n_q, n = Qa.shape[0], Ka.shape[0]
    if causal and n_q != n:
        raise ValueError(f"{caller}: causal attention needs n_q == n; got n_q={n_q}, n={n}.")
    if p == "softmax" and scale is None:
        scale = 1.0 / np.sqrt(Qa.shape[1])
    kept = _check_kept(kept, n_q, n, causal, caller)
    V64 = Va.astype(np.float64)
    Qs, Ks = _prep_qk(Qa, Ka, p)
    mass = np.zeros(n_q)
    err = np.zeros(n_q)
    for rows, cols, vis in _blocks(n_q, n, causal, None):
        if cols.size == 0:
            continue
        S = Qs[rows] @ Ks[cols].T
        A = _normalise(_weights(S, vis, p, scale))
        full = A @ V64[cols]
        if sp.issparse(kept):
            keep = kept[rows][:, : cols.size].toarray()  # cols == arange(cols.size) here
        else:
            keep = np.zeros_like(vis)
            keep[:, kept[kept < cols.size]] = True
        keep &= vis
        mass[rows] = np.where(vis & ~keep, A, 0.0).sum(axis=1)
        # weights re-derived over the kept keys alone, exactly as lev_attention does (own row max)
        restricted = _normalise(_weights(S, keep, p, scale)) @ V64[cols]
        err[rows] = np.max(np.abs(restricted - full), axis=1, initial=0.0)
    return RestrictionCost(mass, err)
