"""Heavy x^2 / |x|^p attention entries computed from a sketch's state (the engine behind heavy_attention).

Functions on plain arrays, called by :meth:`streamlev.LevSketch.heavy_attention`
and :meth:`streamlev.LpSketch.heavy_attention` with a consistent copy of their
state; :func:`streamlev.attention.heavy_attention` documents the guarantee.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._constants import BLOCK_ELEMS, CANDIDATE_SLACK
from ._scaling import pow2_exponent
from ._validation import check_eps

__all__ = ["HeavyEntries", "query_threshold", "heavy_x2", "heavy_p"]


class HeavyEntries:
    """Mixin: ``heavy_attention`` for a sketch that implements ``_heavy_entries(Q, e, id_map)``."""

    def heavy_attention(self, Q, eps: float | None = None, *, id_map: bool = False):
        """Every (query, key) pair whose attention share over all keys seen is >= eps.

        Parameters
        ----------
        Q : array_like of shape (n_q, d) or (d,)
            Queries: float16/32/64, integers, or a CPU torch tensor.
        eps : float, optional
            Entry threshold, >= the sketch's eps (default ``self.eps``).
        id_map : bool, default=False
            If True, label columns by position in a returned sorted id array.

        Returns
        -------
        A : scipy.sparse.csr_matrix of shape (n_q, max(n, max id + 1)), or (n_q, num_retained) with id_map
            The entries >= eps and their shares; ``(A, ids)`` when ``id_map``.

        Notes
        -----
        See :func:`streamlev.attention.heavy_attention` for the guarantee (exact
        for a LevSketch, within the embedding's accuracy for an LpSketch).
        """
        e = query_threshold(self, eps, id_map)
        return self._heavy_entries(Q, e, id_map)


def query_threshold(sketch, eps, id_map) -> float:
    """The entry threshold of a heavy_attention call (>= the sketch's eps), with id_map checked."""
    e = sketch.eps if eps is None else check_eps(eps, caller="heavy_attention")
    if e < sketch.eps:
        raise ValueError(f"heavy_attention: eps={e!r} is below the sketch's eps={sketch.eps!r}; keys whose score "
                         "was below it were not kept, so smaller entries cannot be found. Build the sketch with a "
                         "smaller eps.")
    if not isinstance(id_map, (bool, np.bool_)):
        raise TypeError(f"heavy_attention: id_map must be True or False, got {id_map!r}.")
    return e


def check_ids_as_columns(ids, id_map):
    if not id_map and ids.size and ids[0] < 0:
        raise ValueError(f"heavy_attention: the sketch holds negative key ids (e.g. {int(ids[0])}), which cannot be "
                         "column indices; pass id_map=True to get columns labelled by an id array.")


def entries_matrix(vals, cols, indptr, cand, ids, n, n_q, id_map):
    """CSR of the heavy entries: columns are key ids (or positions in ``ids`` with id_map)."""
    if id_map:
        return sp.csr_matrix((vals, cand[cols], indptr), shape=(n_q, ids.size)), ids
    width = max(n, int(ids[-1]) + 1 if ids.size else 0)
    return sp.csr_matrix((vals, ids[cand][cols], indptr), shape=(n_q, width))



def heavy_x2(Q, R, ids, Ks, tau, n: int, sketch_eps: float, e: float, id_map: bool):
    """x^2 heavy entries from a LevSketch's state: R (scaled factor), sorted ids, scaled keys, exact scores."""
    check_ids_as_columns(ids, id_map)
    cand = np.flatnonzero(tau >= max(sketch_eps, e - CANDIDATE_SLACK))
    indptr, cols, vals = heavy_rows(Q, R, Ks[cand], e)
    return entries_matrix(vals, cols, indptr, cand, ids, n, Q.shape[0], id_map)


def heavy_p(Q, ids, ub, Kr, S, w, n: int, p: float, delta: float, e: float, id_map: bool):
    """|x|^p heavy entries from an LpSketch's state with a normaliser (p != 2 or p == 2 alike).

    Candidates: retained keys whose sensitivity bound ``ub`` is >= e (``alpha_j >=
    A_ij``, so no heavy key is missing). Numerator ``|<q,k_j>|^p`` exact;
    denominator ``est(q)`` from the LpEmbedding terms (S, w); entry reported when
    ``|<q,k_j>|^p >= e (1 - delta) est(q)``, with value ``|<q,k_j>|^p / est(q)``.
    """
    check_ids_as_columns(ids, id_map)
    cand = np.flatnonzero(ub >= e)
    n_q = Q.shape[0]
    indptr, cols, vals = [0], [], []
    step = max(1, BLOCK_ELEMS // max(1, S.shape[0] + cand.size))
    for a in range(0, n_q, step):
        Qb = Q[a : a + step]
        # each query scaled by a power of two: A is invariant to the scale of q, |.|^p cannot overflow early
        mq = np.max(np.abs(Qb), axis=1)
        Qb = np.ldexp(Qb, -pow2_exponent(mq)[:, None])
        Y = Qb @ S.T
        my = np.max(np.abs(Y), axis=1) if S.shape[0] else np.zeros(Qb.shape[0])
        sh = pow2_exponent(my)[:, None]
        est = np.abs(np.ldexp(Y, -sh)) ** p @ w
        num = np.abs(np.ldexp(Qb @ Kr[cand].T, -sh)) ** p
        hit = (num >= (e * (1.0 - delta)) * est[:, None]) & (num > 0) & (est[:, None] > 0)
        for i in range(Qb.shape[0]):
            jj = np.flatnonzero(hit[i])
            cols.append(jj)
            vals.append(num[i, jj] / est[i])
            indptr.append(indptr[-1] + jj.size)
    cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    vals = np.concatenate(vals) if vals else np.zeros(0)
    indptr = np.asarray(indptr, dtype=np.int64)
    return entries_matrix(vals, cols, indptr, cand, ids, n, n_q, id_map)


def heavy_rows(Q, R, Kc, eps):
    n_q, d = Q.shape
    r = Kc.shape[0]
    step = max(1, min(n_q, BLOCK_ELEMS // max(r, d, 1)))
    counts = np.zeros(n_q, dtype=np.int64)
    cols, vals = [], []
    for s in range(0, n_q, step):
        X = Q[s : s + step].astype(np.float64)
        X = np.ldexp(X, -pow2_exponent(np.max(np.abs(X), axis=1))[:, None])
        Y = X @ R.T  # rows R q: ||R q||^2 = ||K q||^2 in the sketch's scale
        ey = pow2_exponent(np.max(np.abs(Y), axis=1))
        live = np.any(Y != 0, axis=1)
        Y = np.ldexp(Y, -ey[:, None])
        den = np.einsum("ij,ij->i", Y, Y)  # in [1/4, d]
        den[~live] = np.inf  # K q = 0: the row is empty
        if r == 0:
            continue
        S = X @ Kc.T
        S = np.ldexp(S, -ey[:, None])
        S *= S
        S /= den[:, None]
        np.minimum(S, 1.0, out=S)  # a share cannot exceed 1; rounding on near-null queries could say otherwise
        hit = S >= eps
        rows, cc = np.nonzero(hit)  # row-major: column indices come out sorted within a row
        counts[s : s + step] = np.count_nonzero(hit, axis=1)
        cols.append(cc)
        vals.append(S[rows, cc])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    vals = np.concatenate(vals) if vals else np.zeros(0)
    return indptr, cols.astype(np.int64), vals
