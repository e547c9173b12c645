"""LevSketch: the one-pass, mergeable universal set of attention keys (p = 2).

The sketch keeps the triangular factor R of the Gram matrix of *all* keys seen
(R^T R = K^T K, d x d float64) and the keys whose leverage with respect to the
keys seen so far is at least ``eps``. Because leverage never increases when
rows are added, a key pruned once can never be needed again, and because R
describes all keys exactly, the leverage of every retained key is its exact
offline leverage: the streaming universal set *is* the offline one.
"""

from __future__ import annotations

import math

import numpy as np

from . import _constants as C
from . import _factor, _format
from . import _heavy as heavy
from ._constants import DEFAULT_RTOL
from ._decode import NO_IDS, DecodeState, DecodeStep
from ._ids import IdRange, check_disjoint, check_not_retained
from ._retained import RetainedRows
from ._scaled_factor import ScaledFactor
from ._sketch_base import Changes, KeySketch, changes_between, locked, no_changes, size_bound, transactional
from ._state_format import COMMON_SCHEMA, VALUES_SCHEMA, common_fields, load_common
from ._validation import (check_dim, check_eps, check_ids, check_keys, check_payload, check_rtol,
                          check_state_size)

__all__ = ["LevSketch", "Changes"]


class LevSketch(DecodeStep, heavy.HeavyEntries, KeySketch):
    """One-pass, mergeable universal set of keys for x^2 attention (leverage >= eps).

    Parameters
    ----------
    d : int
        Key dimension.
    eps : float in (0, 1]
        Smallest leverage (attention share) the sketch must be able to report.
    p : float, default=2.0
        Attention exponent, f(x) = |x|^p. Only p = 2 is implemented by this class.
    rtol : float, default=1e-13
        Relative ridge of the numerical leverage definition (see
        :mod:`streamlev.reference`); serialized with the sketch.
    blas_threads : int or None, default=1
        BLAS threads used inside block updates, merges and refreshes (via
        threadpoolctl, restored afterwards; process-wide while the call runs).
        One thread was 2.3x faster than two on a 2-vCPU machine because the
        sketch mixes many small LAPACK calls with large ones; run sketches of
        different heads or shards in parallel instead. ``None`` leaves BLAS as
        configured. A runtime setting: not serialized.
    workers : int, default=2
        Threads for the large BLAS calls of a block update (each chunk's Gram
        matrix and the scoring of many rows), split by rows while BLAS itself
        keeps ``blas_threads``: on 2 vCPUs this made 4096-key blocks 1.15x
        (d = 64) to 1.3x (d = 128) faster (docs/benchmarks.md). Calls too
        small to gain stay in the calling thread; ``1`` never starts one. Results change only by rounding. A runtime
        setting: not serialized.

    Notes
    -----
    Guarantee (no false negatives, exact): after any sequence of ``update`` and
    ``merge`` calls over keys K (any block sizes, any order, any partition),
    ``universal_set(e)`` equals ``{j : tau_j(K) >= e}`` for every ``e >= eps``,
    where tau is the (ridge-tolerant) leverage score. For every query q,
    ``<q,k_j>^2 / ||K q||^2 <= tau_j``, so every x^2 attention entry
    ``A_qj >= e`` has ``j`` in ``universal_set(e)``.

    Size bound, known before any data: ``num_retained <= max_retained(d, eps)
    = floor(d / eps)`` after every call (leverage scores sum to rank(K) <= d).

    Memory: the d x d factor plus the retained keys, ids (and optional payload
    values); independent of the number of keys n.

    Accuracy: scores agree with the exact SVD reference to about ``1e-12``
    relative on well-conditioned keys, and to about ``u * cond(K)`` on
    ill-conditioned ones (u = 2.2e-16); set membership can differ only for keys
    whose score lies within that band of the threshold.

    Ids: ``update`` rejects ids repeated within a block or equal to a currently
    retained id. Ids of evicted keys are not remembered (bounded memory), so
    re-using one of those is not detected.

    Thread safety: every public method holds an internal lock, so concurrent
    calls on one sketch are serialized and never corrupt it (the rule of
    :mod:`streamlev._sketch_base`, shared by every sketch).

    References
    ----------
    R. Kannan, C. Bhattacharyya, P. Kacham, D. P. Woodruff. LevAttention: Time,
    Space, and Streaming Efficient Algorithm for Heavy Attentions. arXiv:2410.05462.

    Examples
    --------
    >>> import numpy as np, streamlev as sl
    >>> K = np.random.default_rng(0).standard_normal((1000, 8))
    >>> sk = sl.LevSketch(8, 0.02).update(K[:600]).update(K[600:])
    >>> bool(np.array_equal(sk.universal_set(), sl.universal_set(K, 0.02)))
    True
    """

    _SCORE = "leverage"

    def __init__(self, d: int, eps: float, *, p: float = 2.0, rtol: float = DEFAULT_RTOL,
                 blas_threads: int | None = 1, workers: int = 2):
        super().__init__()
        self._d = check_dim(d, caller="LevSketch")
        self._eps = check_eps(eps, caller="LevSketch")
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise TypeError(f"The 'p' parameter of LevSketch must be a real number. Got {p!r} instead.")
        if float(p) != 2.0:
            raise ValueError(f"LevSketch implements p=2 (x^2 attention); got p={p!r}. "
                             "Use streamlev.LpSketch for other p.")
        self._p = 2.0
        self._rtol = check_rtol(rtol, caller="LevSketch")
        if blas_threads is not None and (not isinstance(blas_threads, (int, np.integer)) or blas_threads < 1):
            raise ValueError(f"The 'blas_threads' parameter of LevSketch must be None or an int >= 1. "
                             f"Got {blas_threads!r} instead.")
        self._blas_threads = blas_threads
        if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer)) or workers < 1:
            raise ValueError(f"The 'workers' parameter of LevSketch must be an int >= 1. Got {workers!r} instead.")
        self._workers = int(workers)
        check_state_size(self._d, caller="LevSketch")
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self):
        self._n = 0
        self._idr = IdRange()  # smallest and largest id seen (to catch reused id ranges)
        self._f = ScaledFactor(self._d)  # R of all keys seen and the scale 2**-e of stored arrays
        self._rows = RetainedRows(self._d, self.max_retained())  # keys with leverage >= eps; score = exact or upper-bound leverage
        self._pending = 0  # rows folded in since the retained scores were last recomputed exactly
        self._dec = DecodeState()  # rank-one bookkeeping
        self._v = None  # scratch of the rank-one path

    def _snapshot(self):
        return (self._n, self._idr.state(), self._f.snapshot(), self._rows.snapshot(), self._pending,
                self._dec.state())

    def _restore(self, s):
        n, idr, f, rows, self._pending, dec = s
        self._n = n
        self._idr = IdRange(*idr)
        self._f.restore(f)
        self._rows.restore(rows)
        self._dec.set(dec)

    # ------------------------------------------------------------ properties
    @property
    def nbytes(self) -> int:
        """Bytes held by the sketch's arrays (factor, keys, ids, scores, payload)."""
        return int(self._f.R.nbytes + self._rows.nbytes)

    @property
    def gram(self) -> np.ndarray:
        """The Gram matrix K^T K of all keys seen, shape (d, d), float64 (a new array)."""
        with self._lock:
            return self._f.gram(self._n > 0)

    @size_bound
    def max_retained(cls, d: int, eps: float, p: float = 2.0) -> int:
        """A-priori bound on ``num_retained``: ``floor(d / eps)`` for p = 2.

        Usable before any data arrives (``LevSketch.max_retained(d, eps)``) or on a
        sketch (``sk.max_retained()``): leverage scores sum to rank(K) <= d, so at
        most d/eps keys can have leverage >= eps.

        Parameters
        ----------
        d : int
            Key dimension.
        eps : float in (0, 1]
            Threshold.
        p : float, default=2.0
            Attention exponent (only 2 for this class).

        Returns
        -------
        int
        """
        d = check_dim(d, caller="LevSketch.max_retained")
        eps = check_eps(eps, caller="LevSketch.max_retained")
        return int(math.floor(d / eps))

    def _size_params(self):
        return self._d, self._eps

    def __repr__(self) -> str:
        return (f"LevSketch(d={self._d}, eps={self._eps!r}, p={self._p!r}, rtol={self._rtol!r}; "
                f"n={self._n}, num_retained={self._rows.r})")

    # ---------------------------------------------------------------- update
    def update(self, keys, ids=None, values=None, *, return_changes: bool = False):
        """Fold a block of keys into the sketch.

        Parameters
        ----------
        keys : array_like of shape (m, d) or (d,)
            Any real float dtype (float16/32/64) or integers; numpy arrays,
            memory maps and CPU torch tensors are accepted without a full-size
            float64 copy (the block is processed in chunks).
        ids : array_like of int of shape (m,), optional
            Distinct ids of the keys; default ``n, n+1, ..., n+m-1``.
        values : array_like of shape (m, dv), optional
            Payload carried with each key (e.g. the attention value vector) and
            returned with retained keys by :meth:`retained`. Once a sketch holds
            values, every update must pass them.
        return_changes : bool, default=False
            Return a :class:`Changes` (added and evicted ids) instead of self.

        Returns
        -------
        self, or Changes when ``return_changes`` is True.

        Notes
        -----
        An empty block is a no-op. On any error the sketch is left exactly as
        it was before the call. Once at least d keys are in and the factor is
        well conditioned (kappa <= 1e4), blocks of up to 8 keys take the
        rank-one path: O(d^2 + r d) per key with r keys retained, exact
        decisions (scores inside the rounding band are recomputed exactly).
        """
        with self._lock:
            fast = self._try_decode(keys, ids, values, return_changes)  # a single decode key: no copies
            if fast is not None:
                return fast
            K, ids_arr, V = self._checked_block(keys, ids, values)
            m = K.shape[0]
            if m == 0:
                return no_changes() if return_changes else self
            before = self._rows.live_ids.copy() if return_changes else None
            if not (m <= C.DECODE_MAX_ROWS and self._decode_small_block(K, ids_arr, V)):
                self._fold_block(K, ids_arr, V)
            self._rows.fit()
            lo, hi = (int(ids_arr[0]),) * 2 if m == 1 else (int(ids_arr.min()), int(ids_arr.max()))
            self._idr.extend(lo, hi, m)
            return changes_between(before, self._rows.live_ids, ids_arr) if return_changes else self

    def _checked_block(self, keys, ids, values):
        """Validate a block against the sketch (shape, ids, payload); mutates nothing."""
        caller = "LevSketch.update"
        K = check_keys(keys, self._d, caller=caller, check_finite=False)
        m = K.shape[0]
        ids_arr = np.arange(self._n, self._n + m, dtype=np.int64) if ids is None else check_ids(ids, m, caller=caller)
        V = check_payload(values, m, self._rows.dv, self._n > 0, caller=caller)
        if m:
            lo, hi = int(ids_arr.min()), int(ids_arr.max())
            if self._idr.overlaps(lo, hi):  # retained ids lie in [lo, hi]: others cannot clash (O(1) when decoding)
                check_not_retained(ids_arr, self._rows.live_ids, caller)
                self._idr.check_fresh(ids_arr, self._n, caller)
        return K, ids_arr, V

    @transactional
    def _fold_block(self, K, ids, V):
        m = K.shape[0]
        with _factor.blas_threads(self._blas_threads if m > C.DECODE_MAX_ROWS else None):
            for s in range(0, m, C.CHUNK_ROWS):
                t = min(m, s + C.CHUNK_ROWS)
                self._fold(K[s:t], ids[s:t], None if V is None else V[s:t])
            if self._rows.r > self.max_retained():
                self._rescore()

    def _rescale(self, new_e):
        rows = self._rows
        K, shift = self._f.rescale(new_e, rows.K if self._n else None, self._n > 0, "LevSketch", rows.r)
        if K is not None:
            rows.K = K
            self._dec.rescaled(shift)

    def _fold(self, B, ids, V):
        m = B.shape[0]
        if m <= C.DECODE_MAX_ROWS:
            X, e = self._f.prepare(B, self._n > 0, "LevSketch.update")
            sq = gram = None
        else:
            X, e, sq, gram = self._f.prepare_block(B, self._n > 0, "LevSketch.update", self._workers)
        if e > self._f.e:
            self._rescale(e)
        if m <= C.DECODE_MAX_ROWS and self._decode_chunk(X, ids, V):
            return
        kappa = self._f.fold(X, self._workers, gram)
        self._dec.invalidate()  # R changed outside the rank-one path: it waits for the next exact refresh
        self._n += m
        tau_new = _factor.score_rows(self._f.R, X, self._rtol, kappa=kappa, below=self._eps * (1.0 - 1e-9),
                                     workers=self._workers, sq=sq)
        keep = tau_new >= self._eps
        self._rows.append(X[keep], ids[keep], tau_new[keep], None if V is None else V[keep], V)
        self._pending += m
        if self._rows.r and (self._rows.r - int(keep.sum())) * C.RESCORE_RATIO <= self._pending:
            self._rescore(kappa)

    def _rescore(self, kappa=None):
        """Exact leverage of every retained key w.r.t. all keys seen; prune those below eps."""
        rows, R = self._rows, self._f.R
        if kappa is None:
            kappa = _factor.cond_estimate(R)
        gone = NO_IDS
        if rows.r:
            rows.score[: rows.r] = _factor.score_rows(R, rows.live_keys, self._rtol, kappa=kappa,
                                                      workers=self._workers)
            gone = rows.compact(rows.live_scores >= self._eps)
        self._pending = 0
        self._dec.refreshed(kappa, float(np.einsum("ij,ij->", R, R)))
        return gone

    # ---------------------------------------------------------------- queries
    def _refresh(self):
        if self._pending or self._dec.steps:
            with _factor.blas_threads(self._blas_threads):
                self._rescore()

    def retained(self):
        """Retained ids (sorted), their keys (float64, original scale) and payload values (or None).

        Returns
        -------
        ids : ndarray of shape (r,), int64
        keys : ndarray of shape (r, d), float64
        values : ndarray of shape (r, dv) or None
        """
        return self._retained_rows()

    def _heavy_entries(self, Q, e, id_map):
        Q = check_keys(Q, self._d, caller="heavy_attention", name="Q")
        with self._lock:
            self._refresh()  # exact scores of every retained key
            ids, Ks, tau, _ = self._rows.sorted()
            R, n = self._f.R.copy(), self._n
        return heavy.heavy_x2(Q, R, ids, Ks, tau, n, self._eps, e, id_map)

    # ------------------------------------------------------------------ merge
    def _check_compatible(self, other, caller):
        mine = (self._d, self._eps, self._p, self._rtol)
        theirs = (other._d, other._eps, other._p, other._rtol)
        if mine != theirs:
            raise ValueError(f"{caller}: incompatible sketches: this one has (d, eps, p, rtol)={mine}, "
                             f"the other has {theirs}. Only sketches built with the same parameters merge.")
        a, b = self._rows.dv, other._rows.dv
        if other._n and self._n and (a is None) != (b is None):
            raise ValueError(f"{caller}: one sketch carries values and the other does not.")
        if a is not None and b is not None and a != b:
            raise ValueError(f"{caller}: values have {a} columns here and {b} in the other sketch.")

    def merge(self, other: LevSketch, *, return_changes: bool = False):
        """Fold another sketch (built on disjoint keys) into this one; ``other`` is not modified.

        The result is exactly the sketch of the union of both key sets.

        Parameters
        ----------
        other : LevSketch
            Built with the same d, eps, p and rtol on keys with other ids.
        return_changes : bool, default=False
            Return a :class:`Changes` instead of self.

        Returns
        -------
        self, or Changes when ``return_changes`` is True (``added`` holds the
        other sketch's ids that are retained).
        """
        caller = "LevSketch.merge"
        self._check_other(other, caller)  # before taking other's lock: it must be a LevSketch
        with locked(self, other):
            self._check_compatible(other, caller)
            if other._n == 0:
                return no_changes() if return_changes else self
            o_ids = other._rows.live_ids
            check_not_retained(o_ids, self._rows.live_ids, caller, merging=True)
            check_disjoint(self._idr, self._n, self._rows.live_ids, other._idr, other._n, o_ids, caller)
            before = self._rows.live_ids.copy() if return_changes else None
            self._merge_state(other)
            self._rows.fit()
            return changes_between(before, self._rows.live_ids, o_ids) if return_changes else self

    @transactional
    def _merge_state(self, other):
        with _factor.blas_threads(self._blas_threads):
            if other._f.e > self._f.e:
                self._rescale(other._f.e)
            shift = other._f.e - self._f.e
            ro = other._rows
            oR, oK = np.ldexp(other._f.R, shift), np.ldexp(ro.live_keys, shift)
            if self._n == 0:
                self._f.R = np.zeros_like(self._f.R)
            self._f.R = _factor.update_factor(self._f.R, oR)
            self._n += other._n
            self._idr.extend(other._idr.lo, other._idr.hi, other._n)
            oV = None if ro.V is None else ro.V[: ro.r].copy()
            self._rows.append(oK, ro.live_ids.copy(), np.ones(ro.r), oV, oV)
            self._rescore()

    # ---------------------------------------------------------- serialization
    def _to_bytes(self) -> bytes:
        """Write this class's fields (see :meth:`Sketch.to_bytes`)."""
        with self._lock:
            self._refresh()
            ids, keys_scaled, _, vals = self._rows.sorted()
            return _format.dump("LevSketch", common_fields(self._d, self._eps, self._p, self._rtol, self._n, self._f.e,
                                                           self._idr, self._f.R, ids, keys_scaled, values=vals))

    @classmethod
    def _from_bytes(cls, data) -> LevSketch:
        """Parse and check LevSketch bytes (see :meth:`Sketch.from_bytes`)."""
        caller = "LevSketch.from_bytes"
        f = _format.load(data, "LevSketch", COMMON_SCHEMA, optional=VALUES_SCHEMA)
        try:
            sk = cls(int(f["d"]), float(f["eps"]), p=float(f["p"]), rtol=float(f["rtol"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{caller}: invalid parameters in the header: {exc}") from None
        n, e, R, ids, K, sk._idr, V = load_common(f, sk.max_retained(), caller)
        sk._n, sk._f.e, sk._f.R = n, e, R
        sk._rows.set(K.copy(), ids.copy(), np.ones(ids.shape[0]), None if V is None else V.copy())
        if n:
            sk._rescore()
        return sk
