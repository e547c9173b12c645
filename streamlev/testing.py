"""Property-testing helpers for users of streamlev (and for streamlev's own tests).

* :func:`key_matrices` and :func:`query_matrices`: hypothesis strategies for
  key matrices, including adversarial ones (spikes, near-duplicates, low rank,
  ill-conditioned, heavy-tailed norms, zero rows, huge and tiny scales).
* :func:`assert_no_false_negatives`: checks the universal-set contract
  directly, with the worst-case query of every key left out.
* :func:`score_tolerance`: the accuracy the exact algorithms can promise for a
  given key matrix, used to compare sets away from near-ties.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ._constants import DEFAULT_RTOL
from ._scaling import scale_by_max
from .reference import leverage_scores, worst_case_queries
from .sensitivity import sensitivities

__all__ = ["KINDS", "make_keys", "key_matrices", "query_matrices", "assert_no_false_negatives",
           "score_tolerance", "random_partition"]

KINDS = ("gaussian", "heavy_tailed", "low_rank", "ill_conditioned", "duplicates", "near_duplicates",
         "zero_rows", "spikes", "huge", "tiny", "column_scaled")


def make_keys(kind: str, n: int, d: int, seed: int, *, cond: float = 1e12) -> np.ndarray:
    """Deterministic float64 key matrix of a given ``kind`` (see :data:`KINDS`).

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    n, d : int
        Shape.
    seed : int
        Seed of the generator.
    cond : float, default=1e12
        Condition number of the ill-conditioned kinds.

    Returns
    -------
    ndarray of shape (n, d), float64
    """
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((n, d))
    if kind == "gaussian":
        pass
    elif kind == "heavy_tailed":
        K *= np.exp(1.5 * rng.standard_normal((n, 1)))
    elif kind == "low_rank":
        r = int(rng.integers(1, max(2, d)))
        K = rng.standard_normal((n, r)) @ rng.standard_normal((r, d))
    elif kind == "ill_conditioned":
        U, _ = np.linalg.qr(rng.standard_normal((n, min(n, d))))
        V, _ = np.linalg.qr(rng.standard_normal((d, d)))
        s = np.logspace(0, -np.log10(cond), min(n, d))
        K = (U * s) @ V[: min(n, d)]
    elif kind == "duplicates":
        base = rng.standard_normal((max(1, n // 4), d))
        K = base[rng.integers(0, base.shape[0], n)]
    elif kind == "near_duplicates":
        base = rng.standard_normal((max(1, n // 4), d))
        K = base[rng.integers(0, base.shape[0], n)]
        K = K * (1 + 1e-12 * rng.standard_normal(K.shape))
    elif kind == "zero_rows":
        K[rng.random(n) < 0.3] = 0.0
    elif kind == "spikes":
        K *= 1e-3
        idx = rng.choice(n, size=min(n, d), replace=False)
        K[idx] = 1e3 * rng.standard_normal((idx.size, d))
    elif kind == "huge":
        K *= 1e150
    elif kind == "tiny":
        K *= 1e-150
    elif kind == "column_scaled":
        K *= np.logspace(-6, 6, d)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return K


@st.composite
def key_matrices(draw, *, min_n: int = 1, max_n: int = 60, min_d: int = 1, max_d: int = 8, kinds=KINDS):
    """Hypothesis strategy for (n, d) float64 key matrices of adversarial kinds.

    Parameters
    ----------
    min_n, max_n : int
        Range of the number of rows n.
    min_d, max_d : int
        Range of the dimension d.
    kinds : tuple of str
        Kinds drawn from (see :data:`KINDS` and :func:`make_keys`).

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ndarray of shape (n, d), float64.
    """
    d = draw(st.integers(min_d, max_d))
    n = draw(st.integers(min_n, max_n))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_keys(kind, n, d, seed)


@st.composite
def query_matrices(draw, d: int, *, max_q: int = 20):
    """Hypothesis strategy for (n_q, d) float64 query matrices (Gaussian, sparse, and scaled).

    Parameters
    ----------
    d : int
        Query dimension.
    max_q : int
        Largest number of queries n_q.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ndarray of shape (n_q, d), float64.
    """
    nq = draw(st.integers(1, max_q))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((nq, d))
    if draw(st.booleans()):
        Q[rng.random(Q.shape) < 0.7] = 0.0
    return Q * 10.0 ** draw(st.integers(-3, 3))


def random_partition(n: int, seed: int, max_parts: int = 6):
    """Split range(n) into consecutive blocks of random sizes (some may be empty).

    Parameters
    ----------
    n : int
        Number of rows.
    seed : int
        Seed.
    max_parts : int, default=6
        Most blocks.

    Returns
    -------
    list of (start, stop) tuples of int
    """
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, n + 1, size=int(rng.integers(0, max_parts))))
    edges = np.concatenate([[0], cuts, [n]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def score_tolerance(K, rtol: float = DEFAULT_RTOL) -> float:
    """Absolute accuracy of leverage scores that exact float64 algorithms can promise for K.

    A direction with singular value s_i is known to relative accuracy about
    ``u * s_1 / s_i`` (u = 2.2e-16) and enters the ridge-tolerant score with weight
    ``s_i^2 / (s_i^2 + lam)``, ``lam = (rtol ||K||_F)^2``; the tolerance is
    ``1e-9 + 16 * max_i (u s_1 / s_i) * s_i^2 / (s_i^2 + lam)``. That is ~1e-9 for
    well-conditioned keys, grows like u * cond(K), and peaks (about 1e-2) for
    directions right at the ridge scale, where float64 cannot resolve them.
    Singular values below the round-off floor ``f = 8 u s_1 sqrt(max(n, d))``
    (exact rank deficiency) count as directions of size f, which a computed
    factor has instead of exact zeros.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys.
    rtol : float, default=1e-13
        Relative ridge of the scores.

    Returns
    -------
    float
        Absolute tolerance on each leverage score.
    """
    K = np.asarray(K, dtype=np.float64)
    if K.size == 0:
        return 1e-9
    m = np.max(np.abs(K))
    if m == 0:
        return 1e-9
    s = np.linalg.svd(scale_by_max(K)[0], compute_uv=False)
    lam = (rtol * np.sqrt(np.sum(s**2))) ** 2
    u = np.finfo(np.float64).eps
    # round-off directions: a computed factor of rank-deficient keys has singular values ~ f, not 0
    f = 8.0 * u * s[0] * np.sqrt(max(K.shape))
    noise = f**2 / (f**2 + lam) if np.any(s < f) else 0.0
    s = s[s >= f]
    err = (u * s[0] / s) * s**2 / (s**2 + lam)
    return float(1e-9 + 16.0 * max(err.max(), noise))


def assert_no_false_negatives(U, K, eps: float, p: float = 2.0, *, rtol: float = 1e-9) -> None:
    """Check the universal-set contract for every key outside ``U``.

    For p = 2 each key j not in U is attacked with its worst-case query
    ``q_j = (K^T K + lam I)^{-1} k_j``, which maximises the x^2 attention share of key j;
    the share must be below ``eps * (1 + rtol)``. The share is measured with the
    library's documented relative ridge, ``<k_j,q>^2 / (||Kq||^2 + lam ||q||^2)``
    with ``lam = (1e-13 ||K||_F)^2``: it equals the plain share for every query
    whose ``||Kq||`` is not at that round-off scale. For other p the exact
    sensitivity oracle :func:`streamlev.sensitivities` is used (slow: small K).

    Raises
    ------
    AssertionError naming the first keys whose attention can reach eps.

    Parameters
    ----------
    U : array_like of int
        The claimed universal set.
    K : array_like of shape (n, d)
        Keys.
    eps : float
        Threshold.
    p : float, default=2.0
        Attention exponent.
    rtol : float, default=1e-9
        Relative slack on eps for rounding.
    """
    K = np.asarray(K, dtype=np.float64)
    U = np.asarray(U, dtype=np.int64)
    out = np.setdiff1d(np.arange(K.shape[0]), U)
    if out.size == 0:
        return
    if float(p) == 2.0:
        Ks, _ = scale_by_max(K)
        Q = worst_case_queries(Ks, DEFAULT_RTOL)[out]
        num = np.einsum("ij,ij->i", Q, Ks[out]) ** 2
        # The contract carries the documented relative ridge: <k_j,q>^2 <= tau_j (||Kq||^2 + lam ||q||^2).
        # The ridge term only matters for queries whose ||Kq|| is at the ridge scale rtol ||K||_F ||q||.
        lam = (DEFAULT_RTOL * np.linalg.norm(Ks)) ** 2
        den = np.sum((Q @ Ks.T) ** 2, axis=1) + lam * np.sum(Q * Q, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        # leverage itself is the supremum; use it too in case the query lost precision
        share = np.maximum(share, leverage_scores(Ks)[out])
    else:
        share = sensitivities(K, p, idx=out)
    bad = out[share >= eps * (1 + rtol)]
    if bad.size:
        raise AssertionError(f"false negatives: keys {bad[:10].tolist()} are outside U but can receive attention "
                             f"share {np.round(share[np.isin(out, bad)][:10], 6).tolist()} >= eps={eps}")
