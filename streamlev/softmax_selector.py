"""SoftmaxSelector: a streaming, budgeted key selector for one key/value head of a softmax KV cache.

A heuristic for softmax (no share of softmax mass is guaranteed; the exact
``|x|^p`` guarantee of :class:`~streamlev.LevSketch` is a different object and
is untouched). What *is* exact is the bookkeeping: at most ``budget`` keys are
held at any time, sinks and the recent window are counted inside the budget,
keys that no future query can see (outside a sliding window) are never held,
and every score is exactly the documented quantity of the keys and queries
the selector has seen.
"""

from __future__ import annotations

import numpy as np

from ._constants import KEY_RECENT_FRACTION, QUERY_BUFFER, QUERY_HALF_LIFE  # noqa: F401  (QUERY_BUFFER: re-export)
from ._softmax_stream import KEY_RULES, QUERY_RULES, RULES, SoftmaxSelector
from ._validation import check_keys

__all__ = ["SoftmaxSelector", "default_selector", "select_softmax", "RULES", "QUERY_RULES", "KEY_RULES"]

# The class is defined in the private module _softmax_stream; this module is its public home
# (documentation, repr of the class, and pickles name streamlev.softmax_selector.SoftmaxSelector).
SoftmaxSelector.__module__ = __name__


# ---------------------------------------------------------------------- the documented defaults


def default_selector(d: int, budget: int, *, queries: bool, causal: bool = False, window: int | None = None,
                     rope_theta: float | None = None, scale: float | None = None) -> SoftmaxSelector:
    """The documented default :class:`SoftmaxSelector` of each class (``docs/softmax_selectors.md``).

    * query class (``queries=True``): ``rule="observed"`` -- mean attention of
      512 observed query positions over the held keys, pooled (mean) over the
      group's query heads, no forced sinks or recent keys; causal models keep the
      newest 512, move each query to the next position by RoPE (``rope_theta``)
      and weight it by ``2^(-age / 128)`` (``QUERY_HALF_LIFE``); bidirectional
      models keep a seeded uniform sample of every query seen (``query_sample="uniform"``);
    * key-only class, causal: ``rule="small_norm"`` with ``min(4, budget // 4)`` sinks
      and the ``floor(0.5 * budget)`` most recent keys (``KEY_RECENT_FRACTION``);
    * key-only class, bidirectional: ``rule="keydiff"`` (the running mean key direction).

    Every rule and constant was chosen on MiniLM and SmolLM2 only, and confirmed
    on a ViT (two resolutions) and on Gemma 3 (``benchmarks/softmax_selectors_families.py``),
    except the uniform query sample of bidirectional models: it was introduced after the
    ViT at 448 px showed the cost of keeping the newest queries, and confirmed on the ViT at
    518 px, which was not used to choose it.

    Parameters
    ----------
    d : int
        Key dimension.
    budget : int >= 1
        Most keys held.
    queries : bool
        True for the query class (the selector will be fed observed queries), False for key-only.
    causal : bool, default False
    window : int or None
        Sliding-window length of the layer (causal only).
    rope_theta : float or None
        RoPE base of the layer (rotate-half convention), for the causal query class.
    scale : float, default ``1/sqrt(d)``

    Returns
    -------
    SoftmaxSelector
    """
    if queries:
        return SoftmaxSelector(d, budget, rule="observed", causal=causal, window=window, sinks=0, recent=0,
                               rope_theta=rope_theta if causal else None,
                               half_life=QUERY_HALF_LIFE if causal else None, scale=scale)
    if causal:
        return SoftmaxSelector(d, budget, rule="small_norm", causal=True, window=window,
                               recent_fraction=KEY_RECENT_FRACTION, scale=scale)
    return SoftmaxSelector(d, budget, rule="keydiff", causal=False, scale=scale)


def select_softmax(K, budget: int, *, queries=None, causal: bool = False, window: int | None = None,
                   rope_theta: float | None = None, scale: float | None = None) -> np.ndarray:
    """Sorted indices of the keys the default softmax selector keeps, offline.

    Equal to :func:`default_selector` fed with ``K`` (and ``queries``) in one block.

    Parameters
    ----------
    K : array_like of shape (n, d)
        Keys of one key/value head, post-RoPE (what a KV cache holds).
    budget : int >= 1
        Keys kept (``min(budget, n)``, fewer when a sliding window leaves fewer visible keys).
    queries : array_like of shape (m, d) or (g, m, d), optional
        Observed post-RoPE queries only (never the future ones being served):
        None selects the key-only default; (g, m, d) are the g query heads sharing
        this key/value head. Causal models: the queries at positions ``n - m .. n - 1``.
    causal : bool, default False
    window : int or None
        Sliding-window length of the layer (causal only).
    rope_theta : float or None
        RoPE base of the layer (rotate-half convention); used by the causal query
        default to move the observed queries to the next position. Pass it for
        rotary models (without it the queries stay where they were observed).
    scale : float, default ``1/sqrt(d)``

    Returns
    -------
    kept : ndarray of int64, sorted

    Notes
    -----
    A heuristic for softmax: no share of softmax mass is guaranteed. Measured
    on five data sets of four model families in ``docs/softmax_selectors.md``.
    """
    if np.ndim(K) != 2:
        raise ValueError(f"select_softmax: K must be 2-D of shape (n, d); got shape {np.shape(K)}.")
    K = check_keys(K, np.shape(K)[1], caller="select_softmax")
    sk = default_selector(K.shape[1], budget, queries=queries is not None, causal=causal, window=window,
                          rope_theta=rope_theta, scale=scale)
    return sk.update(K, queries).kept()
