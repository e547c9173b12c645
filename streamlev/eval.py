"""Quality of key selection on real attention: streamlev leverage against the selectors used today.

Given per-head queries, keys and values, every selector keeps a subset of the
keys of each head and the attention restricted to it is compared with full
attention. Selectors (``METHODS``; higher score = keep, ties to the earlier key):

===================  =====================================================================
``leverage``         streamlev: exact leverage ``tau_j`` of K. Threshold mode: the
                     universal set ``{tau_j >= eps}`` of a streaming :class:`LevSketch`.
``lewis_p1``         streamlev: l_1 Lewis weights of K (:func:`streamlev.lewis_weights`).
``knorm_small``      ``-||k_j||``: keep small-norm keys (the rule of kvpress ``KnormPress``).
``knorm_large``      ``+||k_j||``: keep large-norm keys (the opposite rule).
``sketch_leverage``  the rule of kvpress ``LeverageScorePress``: centre K over the sequence,
                     right Gaussian sketch ``X = (K - mean) Phi``, ``Phi`` of shape (d, 48)
                     scaled by ``1/sqrt(48)`` (seeded here), score ``x_j^T (X^T X + c I)^{-1} x_j``
                     in float32 with Cholesky jitter ``c = 1e-2, 1e-1, ...``, clamped at 0.
``keydiff``          the rule of kvpress ``KeyDiffPress``: ``-cos(k_j, a)`` with anchor
                     ``a = mean_j k_j/||k_j||`` (keep the keys least aligned with it).
``streaming_llm``    StreamingLLM: the first 4 keys (sinks) plus the most recent ones.
``random``           uniform random subset (seeded).
``oracle``           **sees the queries**: keys with the largest softmax attention received
                     (column sums of ``softmax(Q K^T * scale)``). An upper reference only.
===================  =====================================================================

Metrics of a kept set per head (:func:`head_metrics`): recall of heavy entries
``A_ij >= eps`` under x^2 attention (``A = <q,k>^2 / sum_l <q,k_l>^2``) and
under softmax, the softmax attention mass the kept keys receive, and the
Frobenius relative error of the attention output ``A V`` when softmax is
restricted to the kept keys and renormalised.

Nothing here imports torch or matplotlib.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from ._constants import DEFAULT_RTOL
from ._eval_scores import (EPS, FRACTIONS, HEAVY_SLACK, METHODS, QUERY_AWARE, _check_fractions, _check_method,
                           _check_qkv, _check_scale, _softmax_rows, key_scores, keys_kept, select)
from ._scaling import scale_by_max
from ._topk import top_k
from ._validation import as_real_array, check_eps, check_seed
from .attention import select_keys
from .reference import worst_case_queries
from .sketch import LevSketch

__all__ = ["METHODS", "QUERY_AWARE", "FRACTIONS", "EPS", "key_scores", "keys_kept", "select", "head_metrics",
           "evaluate_head", "evaluate", "summarize"]

# --------------------------------------------------------------------- metrics
class _Head:
    """Full attention of one head, computed once and reused for every kept set."""

    def __init__(self, Q, K, V, scale, causal):
        n_q, n = Q.shape[0], K.shape[0]
        if causal and n_q != n:
            raise ValueError(f"causal attention needs one query per key; got Q {Q.shape} and K {K.shape}.")
        self.causal = causal
        self.visible = np.tri(n, dtype=bool) if causal else None
        self.A2 = _x2_attention(Q, K, self.visible)
        # x^2 attention of the worst-case query of every key (q_j = (K^T K)^+ k_j gives key j its
        # largest possible share tau_j): the guarantee is "for any query", the real queries are one draw.
        Ks = scale_by_max(K)[0]  # shares are scale-free; the scaled copy keeps ||K||_F finite
        # The guarantee is checked in its documented form: shares with the relative ridge
        # lam = (rtol ||K||_F)^2 in the denominator (of the prefix a causal query sees). It differs
        # from the plain share only for queries with ||Kq|| near round-off scale (cond(K) ~ 1e8 and up).
        row2 = np.einsum("ij,ij->i", Ks, Ks)
        lam = DEFAULT_RTOL**2 * (np.cumsum(row2)[: Q.shape[0]] if causal else row2.sum())
        self.A2_sure = _x2_attention(Q, Ks, self.visible, lam)[1]
        if causal:
            self.A2wc = self.A2wc_sure = None
        else:  # lam is the whole-K ridge here
            self.A2wc, self.A2wc_sure = _x2_attention(worst_case_queries(Ks), Ks, None, lam)
        self.P = _softmax_rows((Q @ K.T) * scale, self.visible)
        self.V = V
        self.O = None if V is None else self.P @ V
        self._cols = {}

    def mask(self, kept):
        """Bool (n_q, n) mask of a causal kept matrix, or the sorted column indices of a non-causal set."""
        if sp.issparse(kept):
            M = kept.toarray().astype(bool)
            return M & self.visible if self.causal else M
        if self.causal:  # one set for every query, intersected with what each query can see
            M = np.zeros(self.P.shape, dtype=bool)
            M[:, kept] = True
            return M & self.visible
        return np.asarray(kept, dtype=np.int64)

    def _heavy_cols(self, name, A, e):
        key = (name, e)
        if key not in self._cols:
            self._cols[key] = (A >= e).sum(axis=0)
        return self._cols[key]

    def metrics(self, M, eps):
        """Metrics of a kept set given by :meth:`mask` (columns: fast path, O(n) per threshold)."""
        cols = M.ndim == 1
        tables = [("x2", self.A2, 1.0), ("softmax", self.P, 1.0), ("x2_sure", self.A2_sure, 1.0 + HEAVY_SLACK)]
        if self.A2wc is not None:
            tables += [("x2wc", self.A2wc, 1.0), ("x2wc_sure", self.A2wc_sure, 1.0 + HEAVY_SLACK)]
        out = {}
        for e in eps:
            for name, A, slack in tables:
                if cols:
                    c = self._heavy_cols(name, A, e * slack)
                    heavy, kept = int(c.sum()), int(c[M].sum())
                else:
                    H = A >= e * slack
                    heavy, kept = int(H.sum()), int((H & M).sum())
                if name.endswith("_sure"):
                    # entries clearly above eps (not within rounding of it): what the guarantee is about
                    out[f"{name[:-5]}_missed_sure@{e:g}"] = heavy - kept
                else:
                    out[f"{name}_heavy@{e:g}"], out[f"{name}_kept@{e:g}"] = heavy, kept
        PS = self.P[:, M] if cols else np.where(M, self.P, 0.0)
        mass = PS.sum(axis=1)
        out["mass"] = float(mass.mean())
        if self.O is not None:
            PS = np.divide(PS, mass[:, None], out=np.zeros_like(PS), where=mass[:, None] > 0)
            OS = PS @ (self.V[M] if cols else self.V)
            den = float(np.linalg.norm(self.O))
            out["out_err"] = float(np.linalg.norm(OS - self.O) / den) if den > 0 else 0.0
        return out


def _x2_attention(Q, K, visible, lam=None):
    """x^2 attention shares; given lam (scalar or per query), also the shares whose denominator
    carries lam ||q||^2 (the documented ridge form), as a pair (plain, ridged) from one product."""
    S = Q @ K.T
    S2 = S * S if visible is None else np.where(visible, S * S, 0.0)
    z = S2.sum(axis=1, keepdims=True)
    plain = np.divide(S2, z, out=np.zeros_like(S2), where=z > 0)
    if lam is None:
        return plain
    z = z + (np.asarray(lam, dtype=np.float64) * np.einsum("ij,ij->i", Q, Q)).reshape(-1, 1)
    return plain, np.divide(S2, z, out=np.zeros_like(S2), where=z > 0)


def head_metrics(Q, K, V, kept, *, eps=EPS, scale=None, causal: bool = False) -> dict:
    """Quality of one kept set of keys for one head, against full attention.

    Parameters
    ----------
    Q : array_like of shape (n_q, d)
    K : array_like of shape (n, d)
    V : array_like of shape (n, dv), or None (no output error)
    kept : int indices of kept keys, or (causal) a sparse/bool (n, n) matrix
        whose row i holds the keys kept for query i.
    eps : sequence of float in (0, 1]
        Heavy-entry thresholds.
    scale : float, optional
        Softmax scale (default ``1/sqrt(d)``).
    causal : bool, default False
        Query i sees keys 0..i only (for full and restricted attention alike).

    Returns
    -------
    dict with, for every e in eps, ``x2_heavy@e`` / ``x2_kept@e`` (number of
    x^2 entries ``A_ij >= e`` and how many of them have j kept for query i),
    ``x2_missed_sure@e`` (missed entries with ``A_ij >= e (1 + 1e-9)``, the
    share measured as the contract states it, with the documented relative
    ridge ``lam ||q||^2`` added to its denominator); the
    same three for x^2 attention of the *worst-case queries* (``x2wc_*``,
    non-causal only: query j is ``(K^T K)^+ k_j``, which gives key j its
    largest possible share ``tau_j``, so these entries probe "any query"
    rather than the model's queries); ``softmax_heavy@e`` /
    ``softmax_kept@e`` for softmax; ``mass`` (mean
    over queries of the softmax share of the kept keys) and, when V is given,
    ``out_err = ||A_S V - A V||_F / ||A V||_F`` with ``A_S`` softmax restricted
    to the kept keys and renormalised per row.

    Notes
    -----
    x^2 attention is ``<q_i,k_j>^2 / sum_l <q_i,k_l>^2`` (invariant to the
    scale of q); softmax is ``softmax(Q K^T * scale)``. A row whose kept set is
    empty contributes output 0 (and mass 0).
    """
    caller = "head_metrics"
    Q, K, V = _check_qkv(Q, K, V, caller)
    eps = tuple(check_eps(e, caller=caller) for e in eps)
    h = _Head(Q, K, V, _check_scale(scale, K.shape[1], caller), bool(causal))
    if sp.issparse(kept) or (np.ndim(kept) == 2):
        kept = sp.csr_matrix(np.asarray(kept.toarray() if sp.issparse(kept) else kept, dtype=bool))
        if kept.shape != h.P.shape:
            raise ValueError(f"{caller}: kept has shape {kept.shape}; expected {h.P.shape} (queries x keys).")
    else:
        kept = np.asarray(kept, dtype=np.int64)
        if kept.size and (kept.min() < 0 or kept.max() >= K.shape[0]):
            raise ValueError(f"{caller}: kept indices must lie in [0, {K.shape[0]}); got {kept.min()}..{kept.max()}.")
    return h.metrics(h.mask(kept), eps)


# -------------------------------------------------------------------- harness
def _threshold_sets(K, e, causal):
    """The streamlev universal set at eps=e: a streaming LevSketch (non-causal) or per prefix."""
    if causal:
        return select_keys(K, eps=e, causal=True)
    sk = LevSketch(K.shape[1], e)
    for start in range(0, K.shape[0], 64):  # fed as a stream of blocks, as a prefill would
        sk.update(K[start:start + 64])
    return sk.universal_set(e)


def evaluate_head(Q, K, V, *, fractions=FRACTIONS, eps=EPS, methods=METHODS, recall_eps=0.1, seed: int = 0,
                  scale=None, causal: bool = False) -> list:
    """Every selector at every budget and threshold on one head.

    Parameters
    ----------
    Q, K, V : arrays of shape (n_q, d), (n, d), (n, dv)
    fractions : budgets ``ceil(f n)`` for f in fractions (budget mode).
    eps : thresholds (threshold mode): streamlev keeps its universal set
        ``{tau_j >= e}`` (a streaming :class:`~streamlev.LevSketch`; per prefix
        when causal) and every other selector keeps the same number of keys
        (per query when causal).
    methods : subset of :data:`METHODS`
    recall_eps : heavy-entry threshold of the recall metrics in budget mode.
    seed : seed of the random and sketch selectors.
    scale, causal : see :func:`head_metrics`.

    Returns
    -------
    list of dict records: ``mode`` ("budget" or "eps"), ``param`` (fraction or
    eps), ``budget`` (keys kept per query, mean over queries when causal),
    ``method``, ``recall_eps`` and the fields of :func:`head_metrics` at it.

    Raises
    ------
    AssertionError
        If streamlev's threshold set misses an x^2 entry ``A_ij >= e (1 +
        1e-9)``: the guarantee (100% x^2 recall at threshold) is checked on
        every head evaluated.
    """
    caller = "evaluate_head"
    Q, K, V = _check_qkv(Q, K, V, caller)
    fractions = _check_fractions(fractions, caller)
    eps = tuple(check_eps(e, caller=caller) for e in eps)
    recall_eps = check_eps(recall_eps, name="recall_eps", caller=caller)
    methods = tuple(_check_method(m, caller) for m in methods)
    seed = check_seed(seed, caller=caller)
    n = K.shape[0]
    sc = _check_scale(scale, K.shape[1], caller)
    head = _Head(Q, K, V, sc, bool(causal))
    # Scores do not depend on the budget: compute them once per method (non-causal).
    scores = {} if causal else {m: key_scores(m, K, Q, seed=seed, scale=sc) for m in methods}
    recs = []

    def run(mode, param, budget, rec_eps, lev_set=None):
        for m in methods:
            if m == "leverage" and lev_set is not None:
                kept = lev_set
            elif causal:
                kept = keys_kept(m, K, budget, Q, seed=seed, scale=sc, causal=True)
            else:
                kept = top_k(scores[m], min(int(budget), n))
            M = head.mask(kept)
            r = {"mode": mode, "param": param, "method": m, "budget": float(M.size if M.ndim == 1 else M.sum(axis=1).mean()),
                 "recall_eps": rec_eps}
            r.update(head.metrics(M, (rec_eps,)))
            if m == "leverage" and mode == "eps":
                for qs in ("x2", "x2wc"):
                    missed = r.get(f"{qs}_missed_sure@{rec_eps:g}", 0)
                    assert missed == 0, (f"streamlev universal set at eps={rec_eps} missed {missed} x^2 entries "
                                         f"A_ij >= eps ({qs} queries): the no-false-negative guarantee is violated")
            recs.append(r)

    for f in fractions:
        run("budget", f, max(1, math.ceil(f * n)), recall_eps)
    for e in eps:
        U = _threshold_sets(K, e, bool(causal))
        if causal:
            b = np.maximum(np.diff(U.indptr), 1)  # others keep as many keys as streamlev, per query
        else:
            b = max(1, U.size)
        run("eps", e, b, e, lev_set=U)
    return recs


def evaluate(q, k, v, *, fractions=FRACTIONS, eps=EPS, methods=METHODS, recall_eps=0.1, seed: int = 0,
             scale=None, causal: bool = False, doc_ptr=None, layers=None, heads=None, progress=None) -> list:
    """:func:`evaluate_head` over layers, heads and documents.

    Parameters
    ----------
    q, k, v : arrays of shape (n_layers, n_heads, n_tokens, d)
        As returned by :func:`streamlev.datasets.load_minilm` / ``load_qkv``.
    fractions : tuple of float in (0, 1]
        Budget mode: keep ``ceil(f n)`` keys (see :func:`evaluate_head`).
    eps : tuple of float in (0, 1]
        Threshold mode thresholds (see :func:`evaluate_head`).
    methods : tuple of str
        Subset of :data:`METHODS`.
    recall_eps : float
        Heavy-entry threshold of the recall metrics in budget mode.
    seed : int
        Base seed; head (doc, layer, head) uses ``SeedSequence([seed, doc, layer, head])``.
    scale : float, optional
        Softmax logit scale (default ``1/sqrt(d)``).
    causal : bool
        Query i sees keys 0..i only.
    doc_ptr : int array of shape (n_docs + 1,), optional
        Document boundaries on the token axis; each document is its own
        attention problem (its queries see only its keys).
    layers, heads : iterables of int, optional
        Subset to evaluate (default all).
    progress : callable, optional
        Called with (doc, layer, head) before each head.

    Returns
    -------
    list of dict records (those of :func:`evaluate_head` plus ``doc``,
    ``layer``, ``head``, ``n``).
    """
    caller = "evaluate"
    arrs = [np.asarray(as_real_array(a, name=nm, caller=caller, ndim=(4,))) for a, nm in ((q, "q"), (k, "k"), (v, "v"))]
    if arrs[0].shape[:3] != arrs[1].shape[:3] or arrs[1].shape[:3] != arrs[2].shape[:3]:
        raise ValueError(f"{caller}: q, k, v must share (layers, heads, tokens); got {[a.shape for a in arrs]}.")
    q, k, v = arrs
    L, H, N, _ = k.shape
    ptr = np.array([0, N] if doc_ptr is None else doc_ptr, dtype=np.int64)
    if ptr[0] != 0 or ptr[-1] != N or np.any(np.diff(ptr) < 1):
        raise ValueError(f"{caller}: doc_ptr must increase strictly from 0 to {N}; got {ptr.tolist()}.")
    seed = check_seed(seed, caller=caller)
    recs = []
    for doc in range(ptr.size - 1):
        a, b = int(ptr[doc]), int(ptr[doc + 1])
        for li in (range(L) if layers is None else layers):
            for hi in (range(H) if heads is None else heads):
                if progress is not None:
                    progress(doc, li, hi)
                s = int(np.random.SeedSequence([seed, doc, li, hi]).generate_state(1)[0])
                for r in evaluate_head(q[li, hi, a:b], k[li, hi, a:b], v[li, hi, a:b], fractions=fractions,
                                       eps=eps, methods=methods, recall_eps=recall_eps, seed=s, scale=scale,
                                       causal=causal):
                    r.update(doc=doc, layer=int(li), head=int(hi), n=b - a)
                    recs.append(r)
    return recs


def summarize(records, by=("mode", "param", "method")) -> list:
    """Aggregate records over heads: pooled recalls, mean mass, mean and max output error.

    Parameters
    ----------
    records : list of dict from :func:`evaluate` or :func:`evaluate_head`
    by : tuple of record keys to group by (add ``"layer"`` for per-layer rows)

    Returns
    -------
    list of dict, one per group in first-seen order, with the ``by`` keys and
    ``heads`` (records pooled), ``budget`` (mean keys kept), ``recall_x2``,
    ``recall_x2wc`` (worst-case queries) and ``recall_softmax`` (kept heavy
    entries / heavy entries over all heads of the group, NaN if there are
    none), ``heavy_x2`` / ``heavy_x2wc`` / ``heavy_softmax`` (the
    denominators), ``x2_missed_sure`` (x^2 entries clearly >= eps that were
    missed, real and worst-case queries), ``mass`` (mean), ``out_err`` (mean)
    and ``out_err_max``.
    """
    groups = {}
    for r in records:
        groups.setdefault(tuple(r[b] for b in by), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(by, key))
        row["heads"] = len(rs)
        row["budget"] = float(np.mean([r["budget"] for r in rs]))
        for name in ("x2", "x2wc", "softmax"):
            heavy = sum(r.get(f"{name}_heavy@{r['recall_eps']:g}", 0) for r in rs)
            kept = sum(r.get(f"{name}_kept@{r['recall_eps']:g}", 0) for r in rs)
            row[f"heavy_{name}"] = heavy
            row[f"recall_{name}"] = kept / heavy if heavy else float("nan")
        row["x2_missed_sure"] = sum(r[f"x2_missed_sure@{r['recall_eps']:g}"]
                                    + r.get(f"x2wc_missed_sure@{r['recall_eps']:g}", 0) for r in rs)
        row["mass"] = float(np.mean([r["mass"] for r in rs]))
        if all("out_err" in r for r in rs):
            errs = [r["out_err"] for r in rs]
            row["out_err"], row["out_err_max"] = float(np.mean(errs)), float(np.max(errs))
        out.append(row)
    return out
