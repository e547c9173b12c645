"""SoftmaxSelector's streaming state: the held keys, the query buffer and running sums, and how they change.

One concept: the class :class:`streamlev.softmax_selector.SoftmaxSelector` (its
public home, which also holds the documented defaults and the offline
:func:`~streamlev.softmax_selector.select_softmax`): the rules that rank keys,
the keep policy under a budget, update / merge and the byte format.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _format
from ._constants import QUERY_BUFFER, RECENT_FRACTION, SINKS
from ._sketch_base import Changes, Sketch, locked, size_bound, transactional
from ._validation import _check_real_array, check_budget, check_dim, check_keys, check_positive_float
from .softmax_scores import budget_plan, expired_before, key_norm, keydiff, observed_attention, unit_sum

__all__ = ["SoftmaxSelector", "RULES", "QUERY_RULES", "KEY_RULES"]

QUERY_RULES = ("observed", "mean_query")
QUERY_SAMPLES = ("newest", "uniform")
KEY_RULES = ("small_norm", "large_norm", "keydiff")
RULES = QUERY_RULES + KEY_RULES


def _priority(seed: int, ordinals) -> np.ndarray:
    """Seeded pseudo-random uint64 priority of each query ordinal (splitmix64 finalizer).

    A fixed function of (seed, ordinal): the ``query_buffer`` smallest priorities
    of a stream are a uniform sample of its queries that does not depend on how
    the stream was cut into blocks or merged (bottom-k sampling).
    """
    with np.errstate(over="ignore"):
        z = (np.asarray(ordinals, np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _pos_real(x, name, caller):
    return None if x is None else check_positive_float(x, name=name, caller=caller)


def _int_param(x, name, lo, caller, allow_none=False):
    if x is None and allow_none:
        return None
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or int(x) < lo:
        raise ValueError(f"{caller}: {name} must be an int >= {lo}{' or None' if allow_none else ''}; got {x!r}.")
    return int(x)


class SoftmaxSelector(Sketch):
    """At most ``budget`` keys of one key/value head, chosen in one streaming pass; optional observed queries.

    Parameters
    ----------
    d : int
        Key (and query) dimension.
    budget : int >= 1
        Most keys ever held, sinks and recent window included.
    rule : str
        How the keys outside the sinks and recent window are ranked (higher = keep):

        * ``"observed"`` (query class): mean softmax weight each held key gets
          from the latest ``query_buffer`` observed queries, each moved to the
          next position by RoPE (causal, ``rope_theta`` given) and weighted by
          ``2^(-age / half_life)``, pooled (mean) over the group's query heads:
          :func:`~streamlev.softmax_scores.observed_attention`. Recomputed on
          every update, so held keys are re-scored as the queries move on;
        * ``"mean_query"`` (query class): ``k . mean(q)`` over every query seen;
        * ``"small_norm"`` (key-only): ``-||k||`` (the rule of kvpress ``KnormPress``);
        * ``"large_norm"`` (key-only): ``||k||``;
        * ``"keydiff"`` (key-only): ``-cos(k, mean_l k_l/||k_l||)``, the mean over
          *every* key seen so far (re-scored as it moves).
    causal : bool, default=False
        Causal model: a query at position t sees keys at positions <= t.
    window : int >= 1 or None
        Sliding-window length (causal only): a query at t sees keys ``t-window < j <= t``.
        Keys no later query can see are dropped as soon as they expire.
    sinks, recent : int or None
        Initial and most recent keys always held (counted in the budget).
        Default :func:`~streamlev.softmax_scores.budget_plan`: causal models
        ``min(4, budget // 4)`` sinks and ``floor(recent_fraction * budget)``
        recent keys; bidirectional models none.
    recent_fraction : float in [0, 1), default 0.25
        Used only when ``recent`` is None.
    rope_theta : float or None
        RoPE base of the layer (rotate-half convention, as in Llama, Gemma,
        Mistral): lets ``"observed"`` move cached post-RoPE queries to the next
        position. None for models without rotary embeddings.
    half_life : float > 0 or None
        ``"observed"`` in a causal model: query age weighting (None: equal weights).
    query_buffer : int >= 1, default 512
        Observed query positions ``"observed"`` keeps.
    query_sample : {"newest", "uniform"} or None
        Which ``query_buffer`` positions are kept: the newest (causal default:
        recent queries predict the next ones), or a uniform sample of every query
        position seen (bidirectional default: the queries of an encoder have no
        order, and keeping the newest biases the sample to the end of the input).
        The uniform sample keeps the positions whose seeded hash priority is
        smallest, so it is the same however the stream is cut into blocks or merged.
    seed : int >= 0, default 0
        Seed of the ``"uniform"`` sample (serialized).
    query_offset : int >= 0, default 0
        ``"uniform"`` only: ordinal of the first query position this selector
        will see (for :meth:`merge`, like ``offset`` for keys).
    scale : float, default ``1/sqrt(d)``
        Logit scale of the model.
    offset : int >= 0, default 0
        Position of the first key this selector will see (for :meth:`merge`).

    Notes
    -----
    Positions: the i-th key ever fed has position ``offset + i`` and that is its
    id. Queries passed to :meth:`update` with m rows are the queries at the last
    m positions seen after the block is added (causal), or queries that see
    every held key (bidirectional).

    With ``query_sample="uniform"`` the buffered query positions are numbered
    by arrival (``query_offset``, ``query_offset + 1``, ... over every update),
    since a bidirectional model's queries have no position that matters to the
    score.

    Memory: ``budget`` keys plus, for ``"observed"``, ``g * query_buffer``
    queries. Time per update: ``O(g * query_buffer * (held + block) * d)``.

    Streaming vs offline: feeding all keys (and queries) in one block gives
    exactly the offline selection :func:`select_softmax`. Fed in several blocks,
    the result can differ from that offline top-B in three stated ways: (1) an
    evicted key never comes back, even if a later statistic (new queries, the
    running key mean of ``"keydiff"``) would rank it higher; (2) with
    ``"observed"`` the softmax of each buffered query runs over the keys held
    at that time, not over every key ever seen; (3) a key that was in the forced
    recent window when a better key was evicted stays while the other is gone.
    With a static score (``"small_norm"``, ``"large_norm"``) and no sliding
    window the streamed set equals the offline one.
    ``benchmarks/softmax_selectors_families.py --streaming`` measures the
    difference on real heads.

    Thread safety: public methods hold an internal lock.
    """

    def __init__(self, d: int, budget: int, *, rule: str = "observed", causal: bool = False,
                 window: int | None = None, sinks: int | None = None, recent: int | None = None,
                 recent_fraction: float = RECENT_FRACTION, rope_theta: float | None = None,
                 half_life: float | None = None, query_buffer: int = QUERY_BUFFER,
                 query_sample: str | None = None, seed: int = 0, scale: float | None = None, offset: int = 0,
                 query_offset: int = 0):
        super().__init__()
        c = "SoftmaxSelector"
        self._d = check_dim(d, caller=c)
        self._budget = check_budget(budget, caller=c)
        if rule not in RULES:
            raise ValueError(f"{c}: rule must be one of {RULES}; got {rule!r}.")
        self._rule = rule
        self._causal = bool(causal)
        self._window = _int_param(window, "window", 1, c, allow_none=True)
        if self._window is not None and not self._causal:
            raise ValueError(f"{c}: a sliding window needs causal=True (got window={window}, causal=False).")
        if not (isinstance(recent_fraction, numbers.Real) and 0.0 <= float(recent_fraction) < 1.0):
            raise ValueError(f"{c}: recent_fraction must be a real number in [0, 1); got {recent_fraction!r}.")
        ds, dr = budget_plan(self._budget, causal=self._causal, recent_fraction=float(recent_fraction), sinks=SINKS)
        self._sinks = ds if sinks is None else _int_param(sinks, "sinks", 0, c)
        self._recent = dr if recent is None else _int_param(recent, "recent", 0, c)
        if self._sinks + self._recent > self._budget:
            raise ValueError(f"{c}: sinks + recent must not exceed the budget; got sinks={self._sinks}, "
                             f"recent={self._recent}, budget={self._budget}.")
        self._theta = _pos_real(rope_theta, "rope_theta", c)
        if self._theta is not None and self._d % 2:
            raise ValueError(f"{c}: rope_theta needs an even dimension d (rotary pairs); got d={self._d}.")
        self._half_life = _pos_real(half_life, "half_life", c)
        if self._half_life is not None and not self._causal:
            raise ValueError(f"{c}: half_life needs causal=True (queries of a bidirectional model have no order).")
        self._qcap = _int_param(query_buffer, "query_buffer", 1, c)
        if query_sample is None:
            query_sample = "newest" if self._causal else "uniform"
        if query_sample not in QUERY_SAMPLES:
            raise ValueError(f"{c}: query_sample must be one of {QUERY_SAMPLES} or None; got {query_sample!r}.")
        if query_sample == "uniform" and self._causal:
            raise ValueError(f"{c}: query_sample='uniform' needs causal=False (a causal model's next queries are "
                             "best predicted by its newest ones); use 'newest'.")
        self._qsample = query_sample
        self._seed = _int_param(seed, "seed", 0, c)
        self._qoffset = _int_param(query_offset, "query_offset", 0, c)
        self._scale = _pos_real(scale, "scale", c) or 1.0 / np.sqrt(self._d)
        self._offset = _int_param(offset, "offset", 0, c)
        self._n = 0
        self._nq = 0
        self._nqp = 0  # query positions seen (the next query's ordinal under "uniform")
        self._ids = np.zeros(0, np.int64)
        self._K = np.zeros((0, self._d))
        self._Qb = np.zeros((0, 0, self._d))  # (g, buffered, d) newest observed queries ("observed")
        self._qb_pos = np.zeros(0, np.int64)
        self._usum = np.zeros(self._d)  # sum of unit keys over every key seen ("keydiff")
        self._qsum = np.zeros(self._d)  # sum of every query seen ("mean_query")

    # ------------------------------------------------------------------ properties
    budget = property(lambda self: self._budget, doc="Most keys ever held.")
    rule = property(lambda self: self._rule, doc="The score rule.")
    causal = property(lambda self: self._causal, doc="Whether the model is causal.")
    window = property(lambda self: self._window, doc="Sliding-window length, or None.")
    sinks = property(lambda self: self._sinks, doc="Initial keys always held.")
    recent = property(lambda self: self._recent, doc="Most recent keys always held.")
    rope_theta = property(lambda self: self._theta, doc="RoPE base used to move queries, or None.")
    half_life = property(lambda self: self._half_life, doc="Query half-life of ``observed`` (None: no decay).")
    query_buffer = property(lambda self: self._qcap, doc="Observed query positions kept.")
    query_sample = property(lambda self: self._qsample, doc="Which query positions the buffer keeps.")
    seed = property(lambda self: self._seed, doc="Seed of the uniform query sample.")
    query_offset = property(lambda self: self._qoffset, doc="Ordinal of the first query position (uniform sample).")
    query_positions = property(lambda self: self._nqp, doc="Number of query positions seen.")
    scale = property(lambda self: self._scale, doc="Logit scale.")
    offset = property(lambda self: self._offset, doc="Position of the first key.")
    n_queries = property(lambda self: self._nq, doc="Number of query vectors seen (heads x positions).")
    num_retained = property(lambda self: int(self._ids.size), doc="Number of keys held (<= budget).")

    @size_bound
    def max_retained(cls, budget: int, window: int | None = None) -> int:
        """A-priori bound on :attr:`num_retained`: ``budget``, or ``min(budget, window - 1)`` with a window.

        Parameters
        ----------
        budget : int
            The selector's budget.
        window : int or None
            Its sliding window (a query at t sees keys ``t-window < j <= t``).

        Returns
        -------
        int
        """
        return int(budget) if window is None else max(1, min(int(budget), int(window) - 1))

    def _size_params(self):
        return self._budget, self._window

    @property
    def nbytes(self) -> int:
        """Bytes held by the state arrays."""
        return int(sum(a.nbytes for a in (self._ids, self._K, self._Qb, self._qb_pos, self._usum, self._qsum)))

    def __repr__(self) -> str:
        return (f"SoftmaxSelector(d={self._d}, budget={self._budget}, rule={self._rule!r}, causal={self._causal}, "
                f"window={self._window}, sinks={self._sinks}, recent={self._recent}; n={self._n}, "
                f"num_retained={self.num_retained})")

    # ------------------------------------------------------------------ scores
    def _scores(self, ids, K, n_end):
        r = self._rule
        if r == "observed":
            return observed_attention(K, ids, self._Qb, self._qb_pos, next_pos=n_end, causal=self._causal,
                                      window=self._window, rope_theta=self._theta, half_life=self._half_life,
                                      scale=self._scale)
        if r == "mean_query":
            return K @ (self._qsum / self._nq) if self._nq else np.zeros(K.shape[0])
        if r == "large_norm":
            return key_norm(K)
        if r == "small_norm":
            return -key_norm(K)
        return keydiff(K, self._usum)

    def held_scores(self):
        """Held ids and their current scores under the rule.

        Returns
        -------
        ids : ndarray of shape (r,), int64, sorted
        score : ndarray of shape (r,), float64 (higher = keep; sinks and recent keys are kept whatever it is)
        """
        with self._lock:
            return self._ids.copy(), self._scores(self._ids, self._K, self._offset + self._n)

    def retained(self):
        """Held ids and keys (copies).

        Returns
        -------
        ids : ndarray of shape (r,), int64, sorted
        keys : ndarray of shape (r, d), float64
        """
        with self._lock:
            return self._ids.copy(), self._K.copy()

    def kept(self) -> np.ndarray:
        """Sorted ids of the keys held now.

        Returns
        -------
        ids : ndarray of shape (r,), int64, sorted
        """
        with self._lock:
            return self._ids.copy()

    def top(self, budget: int | None = None) -> np.ndarray:
        """Sorted ids of the ``budget`` best held keys: sinks, then recent keys, then by score.

        Parameters
        ----------
        budget : int >= 0 or None
            How many; None returns every held key.

        Returns
        -------
        ids : ndarray of shape (min(budget, r),), int64, sorted
        """
        with self._lock:
            if budget is None:
                return self._ids.copy()
            b = check_budget(budget, caller="SoftmaxSelector.top", minimum=0)
            return self._choose(self._ids, self._K, self._offset + self._n, b)

    # ------------------------------------------------------------------ core
    def _choose(self, ids, K, n_end, budget):
        """Sorted ids kept among candidates: drop expired, force sinks and recent, fill by score (ties: lower id)."""
        live = np.ones(ids.size, bool) if self._window is None else ids >= expired_before(n_end, self._window)
        forced = live & ((ids < self._sinks) | (ids >= n_end - self._recent))
        fid = ids[forced]
        if fid.size > budget:  # only for top(b) below the forced count: sinks first, then the most recent
            return np.sort(np.concatenate([fid[fid < self._sinks], fid[fid >= self._sinks][::-1]])[:budget])
        rest = budget - fid.size
        cand = np.flatnonzero(live & ~forced)
        if rest and cand.size:
            sc = self._scores(ids[cand], K[cand], n_end)
            order = np.lexsort((ids[cand], -sc))[:rest]
            fid = np.concatenate([fid, ids[cand[order]]])
        return np.sort(fid)

    def _check_queries(self, queries, m_keys, caller):
        if queries is None:
            return None
        Q = _check_real_array(queries, name="queries", caller=caller)
        if Q.ndim == 1:
            Q = Q.reshape(1, 1, -1)
        elif Q.ndim == 2:
            Q = Q[None]
        if Q.ndim != 3 or Q.shape[2] != self._d:
            raise ValueError(f"{caller}: queries must have shape (m, {self._d}) or (g, m, {self._d}) for the g "
                             f"query heads of this key/value head; got {np.shape(queries)}.")
        if Q.size and not np.isfinite(Q).all():
            raise ValueError(f"{caller}: queries contain NaN or Inf; the selector was left unchanged.")
        if self._Qb.shape[1] and Q.shape[0] != self._Qb.shape[0]:
            raise ValueError(f"{caller}: earlier queries came from {self._Qb.shape[0]} query heads, these from "
                             f"{Q.shape[0]}; pass the same group of heads every time.")
        if self._causal and Q.shape[1] > self._n + m_keys:
            raise ValueError(f"{caller}: a causal selector takes the queries of the last m positions; got "
                             f"{Q.shape[1]} queries but only {self._n + m_keys} positions exist.")
        return np.asarray(Q, np.float64)

    def _push_queries(self, Q, qpos):
        """Append observed queries to the buffer; keep the newest or the uniform sample of ``query_buffer``."""
        Qb = Q if not self._Qb.shape[1] else np.concatenate([self._Qb, Q], axis=1)
        pos = np.concatenate([self._qb_pos, qpos])
        if pos.size <= self._qcap:
            return Qb, pos
        if self._qsample == "newest":
            return Qb[:, -self._qcap:], pos[-self._qcap:]
        keep = np.sort(np.lexsort((pos, _priority(self._seed, pos)))[:self._qcap])  # ordinals stay ascending
        return Qb[:, keep], pos[keep]

    @transactional
    def update(self, keys, queries=None, *, return_changes: bool = False):
        """Add a block of keys (the next positions), optionally with queries; evict down to the budget.

        Parameters
        ----------
        keys : array_like of shape (m, d) or (d,)
            Post-RoPE keys, as cached (m may be 0 to pass queries only).
        queries : array_like of shape (mq, d) or (g, mq, d), optional
            Observed queries (never the future ones being served), of the g query
            heads reading this key/value head, post-RoPE. Causal: the queries at
            the last mq positions. Bidirectional: queries that see every key.
            Used by the query rules; ignored (but validated) by the key-only rules.
        return_changes : bool, default False
            Return a :class:`~streamlev.sketch.Changes` (``added``: ids of this
            block that are held after the call; ``evicted``: ids held before the
            call and not after) instead of self.

        Returns
        -------
        self, or Changes when ``return_changes`` is True

        Raises
        ------
        ValueError, TypeError
            Wrong shapes, dtypes, NaN or Inf; the selector is left unchanged.
        """
        caller = "SoftmaxSelector.update"
        K = np.asarray(check_keys(keys, self._d, caller=caller, check_finite=True), np.float64)
        m = K.shape[0]
        Q = self._check_queries(queries, m, caller)
        with self._lock:
            before = self._ids.copy()
            start = self._offset + self._n
            n_end = start + m
            new_ids = np.arange(start, n_end, dtype=np.int64)
            ids = np.concatenate([self._ids, new_ids])
            Kc = np.vstack([self._K, K])
            Qb, qb_pos, qsum, nq, nqp = self._Qb, self._qb_pos, self._qsum, self._nq, self._nqp
            if Q is not None and Q.shape[1]:
                mq = Q.shape[1]
                first = self._qoffset + nqp if self._qsample == "uniform" else n_end - mq
                Qb, qb_pos = self._push_queries(Q, np.arange(first, first + mq, dtype=np.int64))
                qsum, nq, nqp = qsum + Q.sum(axis=(0, 1)), nq + Q.shape[0] * mq, nqp + mq
            self._Qb, self._qb_pos, self._qsum, self._nq, self._nqp = Qb, qb_pos, qsum, nq, nqp
            self._usum = self._usum + unit_sum(K)
            return self._cut(ids, Kc, m, before, new_ids, return_changes)

    def merge(self, other: SoftmaxSelector, *, return_changes: bool = False):
        """Append the stream of another selector after this one's: it becomes the next segment.

        The other selector's positions are shifted to follow this one's
        (``shift = self.offset + self.n - other.offset``; zero when it was built
        with ``offset=self.offset + self.n``). The union of both held sets is cut
        back to the budget by the rule, with the query buffers concatenated (the
        other's queries are the newer ones) and the running statistics added.
        With ``query_sample="uniform"`` the other's query ordinals are shifted the
        same way (``query_offset``) and the union re-sampled: when the other was
        built with ``query_offset=self.query_offset + self.query_positions`` the
        buffer is exactly the one a single stream would hold; otherwise the
        other's queries were sampled under other ordinals and are under-represented.
        Stated difference from one stream: keys evicted inside either segment are
        gone, and each segment's evictions were decided without the other's keys
        and queries. ``other`` is not changed.

        Parameters
        ----------
        other : SoftmaxSelector
            Same parameters (d, budget, rule, causal, window, sinks, recent,
            rope_theta, half_life, query_buffer, query_sample, seed, scale).
        return_changes : bool, default False
            Return a :class:`~streamlev.sketch.Changes` (``added``: the other's
            ids, shifted, held after the call; ``evicted``: this selector's ids
            that left) instead of self.

        Returns
        -------
        self, or Changes when ``return_changes`` is True
        """
        caller = "SoftmaxSelector.merge"
        self._check_other(other, caller)  # before taking other's lock: it must be a SoftmaxSelector
        with locked(self, other):  # both locks in id order; nothing changes before every check passed
            mine, theirs = self._params(), other._params()
            if mine != theirs:
                raise ValueError(f"{caller}: parameters differ (d, budget, rule, causal, window, sinks, recent, "
                                 f"rope_theta, half_life, query_buffer, query_sample, seed, scale): {mine} here, "
                                 f"{theirs} in the other.")
            if self._Qb.shape[1] and other._Qb.shape[1] and self._Qb.shape[0] != other._Qb.shape[0]:
                raise ValueError(f"{caller}: the selectors saw queries of {self._Qb.shape[0]} and "
                                 f"{other._Qb.shape[0]} heads.")
            shift = self._offset + self._n - other._offset
            qshift = self._qoffset + self._nqp - other._qoffset if self._qsample == "uniform" else shift
            o_ids, o_K, o_Qb, o_pos = other._ids + shift, other._K, other._Qb, other._qb_pos + qshift
            o_usum, o_qsum, o_nq, o_n = other._usum, other._qsum, other._nq, other._n
            before = self._ids.copy()
            ids, Kc = np.concatenate([self._ids, o_ids]), np.vstack([self._K, o_K])
            if o_Qb.shape[1]:
                self._Qb, self._qb_pos = self._push_queries(o_Qb, o_pos)
            self._usum, self._qsum, self._nq = self._usum + o_usum, self._qsum + o_qsum, self._nq + o_nq
            self._nqp += other._nqp
            return self._cut(ids, Kc, o_n, before, o_ids, return_changes)

    def _cut(self, ids, K, m, before, new_ids, return_changes):
        """Keep the chosen candidates (ids sorted, keys K) after ``m`` more positions; report the changes."""
        keep = self._choose(ids, K, self._offset + self._n + m, self._budget)
        pos = np.searchsorted(ids, keep)
        self._ids, self._K = ids[pos], K[pos]
        self._n += m
        if return_changes:
            return Changes(np.intersect1d(new_ids, self._ids), np.setdiff1d(before, self._ids))
        return self

    def _params(self):
        return (self._d, self._budget, self._rule, self._causal, self._window, self._sinks, self._recent,
                self._theta, self._half_life, self._qcap, self._qsample, self._seed, self._scale)

    def _snapshot(self):
        return (self._n, self._nq, self._nqp, self._ids, self._K, self._Qb, self._qb_pos, self._usum, self._qsum)

    def _restore(self, snap):
        self._n, self._nq, self._nqp, self._ids, self._K, self._Qb, self._qb_pos, self._usum, self._qsum = snap

    @property
    def is_empty(self) -> bool:
        """True before any key or query was seen."""
        return self._n == 0 and self._nq == 0

    # ------------------------------------------------------------------ bytes
    def _to_bytes(self) -> bytes:
        with self._lock:
            return _format.dump("SoftmaxSelector", {
                "d": np.int64(self._d), "budget": np.int64(self._budget), "rule": np.int64(RULES.index(self._rule)),
                "causal": np.int64(self._causal), "window": np.int64(self._window or 0),
                "sinks": np.int64(self._sinks), "recent": np.int64(self._recent),
                "rope_theta": np.float64(self._theta or 0.0), "half_life": np.float64(self._half_life or 0.0),
                "query_buffer": np.int64(self._qcap), "scale": np.float64(self._scale),
                "offset": np.int64(self._offset), "n": np.int64(self._n), "nq": np.int64(self._nq),
                "heads": np.int64(self._Qb.shape[0]), "ids": self._ids, "keys": self._K,
                "queries": self._Qb.reshape(-1, self._d), "query_pos": self._qb_pos,
                "usum": self._usum, "qsum": self._qsum, "query_sample": np.int64(QUERY_SAMPLES.index(self._qsample)),
                "seed": np.int64(self._seed), "query_positions": np.int64(self._nqp),
                "query_offset": np.int64(self._qoffset)})

    @classmethod
    def _from_bytes(cls, data) -> SoftmaxSelector:
        f = _format.load(data, "SoftmaxSelector", {
            "d": ((), "i8"), "budget": ((), "i8"), "rule": ((), "i8"), "causal": ((), "i8"), "window": ((), "i8"),
            "sinks": ((), "i8"), "recent": ((), "i8"), "rope_theta": ((), "f8"), "half_life": ((), "f8"),
            "query_buffer": ((), "i8"), "scale": ((), "f8"), "offset": ((), "i8"), "n": ((), "i8"),
            "nq": ((), "i8"), "heads": ((), "i8"), "ids": (("r",), "i8"), "keys": (("r", "d"), "f8"),
            "queries": ((None, "d"), "f8"),
            "query_pos": (("w",), "i8"), "usum": (("d",), "f8"), "qsum": (("d",), "f8")},
            optional={"query_sample": ((), "i8"), "seed": ((), "i8"), "query_positions": ((), "i8"),
                      "query_offset": ((), "i8")})
        rule = int(f["rule"])
        qs = int(f.get("query_sample", 0))  # bytes written before the uniform sample existed kept the newest
        if not 0 <= qs < len(QUERY_SAMPLES):
            raise ValueError("SoftmaxSelector.from_bytes: corrupt parameters (query_sample).")
        if not 0 <= rule < len(RULES) or int(f["causal"]) not in (0, 1) or int(f["window"]) < 0:
            raise ValueError("SoftmaxSelector.from_bytes: corrupt parameters.")
        try:
            sk = cls(int(f["d"]), int(f["budget"]), rule=RULES[rule], causal=bool(int(f["causal"])),
                     window=int(f["window"]) or None, sinks=int(f["sinks"]), recent=int(f["recent"]),
                     rope_theta=float(f["rope_theta"]) or None, half_life=float(f["half_life"]) or None,
                     query_buffer=int(f["query_buffer"]), query_sample=QUERY_SAMPLES[qs],
                     seed=int(f.get("seed", 0)), scale=float(f["scale"]), offset=int(f["offset"]),
                     query_offset=int(f.get("query_offset", 0)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"SoftmaxSelector.from_bytes: corrupt parameters ({exc}).") from None
        n, nq, ids, qpos, g = int(f["n"]), int(f["nq"]), f["ids"], f["query_pos"], int(f["heads"])
        r, w = ids.size, qpos.size
        if n < 0 or nq < 0 or g < 0 or r > sk.max_retained() or w > sk._qcap or f["queries"].shape[0] != g * w or \
                (w == 0) != (g == 0) or \
                (r and (np.any(np.diff(ids) <= 0) or ids[0] < sk._offset or ids[-1] >= sk._offset + n)) or \
                (w and np.any(np.diff(qpos) < 0)):
            raise ValueError("SoftmaxSelector.from_bytes: inconsistent state (sizes, ids or query positions).")
        arrays = [f[k] for k in ("keys", "queries", "usum", "qsum")]
        if not all(np.isfinite(a).all() for a in arrays):
            raise ValueError("SoftmaxSelector.from_bytes: state contains NaN or Inf.")
        nqp = int(f.get("query_positions", nq // g if g else 0))
        if nqp < w or (sk._qsample == "uniform" and w and (qpos[0] < sk._qoffset or qpos[-1] >= sk._qoffset + nqp)):
            raise ValueError("SoftmaxSelector.from_bytes: inconsistent state (query positions).")
        sk._n, sk._nq, sk._nqp, sk._ids, sk._K = n, nq, nqp, ids.copy(), f["keys"].copy()
        sk._Qb = f["queries"].reshape(g, w, sk._d).copy()
        sk._qb_pos, sk._usum, sk._qsum = qpos.copy(), f["usum"].copy(), f["qsum"].copy()
        return sk
