"""LpSketch: a one-pass, mergeable superset of the universal set for |x|^p attention, any p > 0.

The |x|^p sensitivity ``alpha_j(K) = sup_q |<k_j,q>|^p / ||K q||_p^p`` never
increases when rows are added (the denominator only grows), so an upper bound
computed on *any* subset of the keys seen that contains j stays valid forever.
The sketch keeps candidate keys with their smallest bound so far and drops a
key once its bound falls below eps. Lewis weights themselves are *not*
monotone for p > 2, so nothing here relies on them being monotone: every bound
is a certified upper bound on the sensitivity w.r.t. a subset.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import _factor, _format
from . import _heavy as heavy
from ._constants import CHUNK_ROWS, DEFAULT_RTOL, LEWIS_FAST_TOL, LEWIS_TIGHT_TOL
from ._ids import IdRange, check_disjoint, check_not_retained
from ._retained import RetainedRows
from ._scaled_factor import ScaledFactor
from ._sketch_base import KeySketch, changes_between, locked, no_changes, size_bound, transactional
from ._state_format import COMMON_SCHEMA, VALUES_SCHEMA, common_fields, load_common
from ._validation import (check_dim, check_eps, check_ids, check_keys, check_p, check_payload, check_rtol,
                          check_state_size)
from .embedding import LpEmbedding
from .lewis import LewisConvergenceWarning, sensitivity_upper_bounds, universal_set_p

__all__ = ["LpSketch", "universal_set_p"]


class LpSketch(heavy.HeavyEntries, KeySketch):
    """One-pass, mergeable superset of the universal set for |x|^p attention.

    Parameters
    ----------
    d : int
        Key dimension.
    eps : float in (0, 1]
        Smallest attention share the sketch must be able to report.
    p : float, default=1.0
        Attention exponent, f(x) = |x|^p, any ``0 < p < inf``.
    rtol : float, default=1e-13
        Relative ridge of every leverage evaluation (see :mod:`streamlev.reference`).
    normalizer : bool, default=False
        Also maintain an :class:`streamlev.embedding.LpEmbedding` of all keys,
        the row normaliser ``||K q||_p^p`` that :func:`streamlev.heavy_attention`
        needs for p != 2. Off by default: it holds ``O(rows d log n)`` numbers
        (thousands of rows) where the candidate set holds ``<= d^max(1,p/2)/eps``.
    delta, seed, normalizer_rows
        Accuracy, sampling seed and coreset size of the normaliser (see
        :class:`~streamlev.embedding.LpEmbedding`); ignored without it.

    Notes
    -----
    Guarantee (no false negatives): after any sequence of ``update`` and
    ``merge`` calls over keys K, ``universal_set(e)`` contains every key j with
    ``alpha_j(K) >= e`` (e >= eps), i.e. every key that some query gives an
    |x|^p attention share >= e. Unlike p = 2 the set is a *superset*: it holds
    keys whose certified upper bound is >= e.

    Bounds used (each computed on a subset of the keys seen, hence valid for
    all of them): for p <= 2, ``tau_j(K_seen)^(p/2)`` from the Gram factor of
    all keys (kept exactly, as in :class:`LevSketch`) and the Lewis-weight bound
    ``w_j`` on the candidates; for p > 2, ``(sum w)^(p/2-1) w_j`` on the
    candidates (see :func:`streamlev.lewis.sensitivity_upper_bounds`, which
    certifies the bound for the iterate actually computed).

    Size bound, known before any data: ``num_retained <= max_retained(d, eps, p)
    = floor(d^max(1, p/2) / eps)``.

    Memory: the d x d factor (p <= 2) plus the candidate keys; independent of n.

    Thread safety: every public method holds an internal lock (the rule of
    :mod:`streamlev._sketch_base`).

    References
    ----------
    LevAttention, arXiv:2410.05462; M. B. Cohen, R. Peng, l_p row sampling by
    Lewis weights, arXiv:1412.0588.

    Examples
    --------
    >>> import numpy as np, streamlev as sl
    >>> K = np.random.default_rng(0).standard_normal((400, 3))
    >>> sk = sl.LpSketch(3, 0.2, p=1.0).update(K[:200]).update(K[200:])
    >>> bool(sk.num_retained <= sl.LpSketch.max_retained(3, 0.2, 1.0))
    True
    """

    _SCORE = "bounds"

    def __init__(self, d: int, eps: float, *, p: float = 1.0, rtol: float = DEFAULT_RTOL, normalizer: bool = False,
                 delta: float = 0.1, seed: int = 0, normalizer_rows: int | None = None):
        super().__init__()
        self._d = check_dim(d, caller="LpSketch")
        self._eps = check_eps(eps, caller="LpSketch")
        self._p = check_p(p, caller="LpSketch")
        self._rtol = check_rtol(rtol, caller="LpSketch", allow_zero=False)
        if not isinstance(normalizer, (bool, np.bool_)):
            raise TypeError(f"The 'normalizer' parameter of LpSketch must be True or False. Got {normalizer!r}.")
        check_state_size(self._d, caller="LpSketch")
        self._emb = LpEmbedding(self._d, self._p, delta=delta, seed=seed, rows=normalizer_rows) if normalizer \
            else None
        self._n = 0
        self._idr = IdRange()
        self._f = ScaledFactor(self._d, keep_unscaled=False)  # used for p <= 2 only
        self._rows = RetainedRows(self._d, self.max_retained())  # candidates; score = certified sensitivity upper bound

    # ------------------------------------------------------------ properties
    normalizer = property(lambda self: self._emb, doc="The LpEmbedding of all keys, or None (normalizer=False).")

    @property
    def nbytes(self) -> int:
        """Bytes held by the sketch's arrays."""
        emb = self._emb.nbytes if self._emb is not None else 0
        return int(self._f.R.nbytes + self._rows.nbytes + emb)

    @size_bound
    def max_retained(cls, d: int, eps: float, p: float = 1.0) -> int:
        """A-priori bound ``floor(d^max(1, p/2) / eps)`` on ``num_retained``.

        Parameters
        ----------
        d : int
            Number of columns of the keys.
        eps : float in (0, 1]
            Smallest attention share the sketch reports.
        p : float, default=1.0
            Exponent of |x|^p attention; the bound grows as d^(p/2) for p > 2.

        Returns
        -------
        int
        """
        d = check_dim(d, caller="LpSketch.max_retained")
        eps = check_eps(eps, caller="LpSketch.max_retained")
        p = check_p(p, caller="LpSketch.max_retained")
        return int(math.floor(d ** max(1.0, p / 2.0) / eps))

    def _size_params(self):
        return self._d, self._eps, self._p

    def __repr__(self) -> str:
        return (f"LpSketch(d={self._d}, eps={self._eps!r}, p={self._p!r}, rtol={self._rtol!r}; "
                f"n={self._n}, num_retained={self.num_retained})")

    def _snapshot(self):
        emb = self._emb._snapshot() if self._emb is not None else None
        return self._n, self._idr.state(), self._f.snapshot(), self._rows.snapshot(), emb

    def _restore(self, snap):
        n, idr, f, rows, emb = snap
        self._n, self._idr = n, IdRange(*idr)
        self._f.restore(f)
        self._rows.restore(rows)
        if emb is not None:
            self._emb._restore(emb)

    # ---------------------------------------------------------------- update
    def update(self, keys, ids=None, values=None, *, return_changes: bool = False):
        """Fold a block of keys into the sketch (the same API as :meth:`LevSketch.update`).

        Parameters
        ----------
        keys : array_like of shape (m, d) or (d,)
            Any real dtype, numpy or CPU torch.
        ids : array_like of int of shape (m,), optional
            Distinct ids, different from the retained ones; default ``n, ..., n+m-1``.
        values : array_like of shape (m, dv), optional
            Payload carried with each key and returned by :meth:`retained`;
            once a sketch holds values, every update must pass them.
        return_changes : bool, default=False
            Return a :class:`~streamlev.Changes` instead of self.

        Returns
        -------
        self, or Changes when ``return_changes`` is True.

        Notes
        -----
        On any error the sketch is left exactly as it was before the call.
        """
        caller = "LpSketch.update"
        with self._lock:
            K = check_keys(keys, self._d, caller=caller, check_finite=False)
            m = K.shape[0]
            ids_arr = np.arange(self._n, self._n + m, dtype=np.int64) if ids is None \
                else check_ids(ids, m, caller=caller)
            V = check_payload(values, m, self._rows.dv, self._n > 0, caller=caller)
            if m == 0:
                return no_changes() if return_changes else self
            check_not_retained(ids_arr, self._rows.live_ids, caller)
            self._idr.check_fresh(ids_arr, self._n, caller)
            before = self._rows.live_ids.copy()
            self._update_state(K, ids_arr, V)
            self._rows.fit()
            return changes_between(before, self._rows.live_ids, ids_arr) if return_changes else self

    @transactional
    def _update_state(self, K, ids, V):
        m = K.shape[0]
        with _factor.blas_threads(1):  # many small LAPACK calls: see streamlev._factor.blas_threads
            for s in range(0, m, CHUNK_ROWS):
                self._fold(K[s : s + CHUNK_ROWS], ids[s : s + CHUNK_ROWS], None if V is None else V[s : s + CHUNK_ROWS])
            if self._emb is not None:
                self._emb.update(K)
        self._idr.extend(ids.min(), ids.max(), m)

    def _rescale(self, e):
        if e > self._f.e:
            self._rows.K, _ = self._f.rescale(e, self._rows.K, self._n > 0, "LpSketch")

    def _fold(self, B, ids, V):
        X, e = self._f.prepare(B, self._n > 0, "LpSketch.update")
        self._rescale(e)
        self._n += X.shape[0]
        ub_new = np.ones(X.shape[0])
        ub_old = self._rows.live_scores.copy()
        if self._p <= 2.0:
            kappa = self._f.fold(X)
            half = self._p / 2.0
            floor = self._eps ** (1.0 / half) * (1.0 - 1e-9)  # tau^(p/2) >= eps  <=>  tau >= eps^(2/p)
            R = self._f.R
            ub_new = np.minimum(ub_new, _factor.score_rows(R, X, self._rtol, kappa=kappa, below=floor) ** half)
            if self._rows.r:
                ub_old = np.minimum(ub_old, _factor.score_rows(R, self._rows.live_keys, self._rtol,
                                                               kappa=kappa) ** half)
        keep_new = (ub_new >= self._eps) & np.any(X != 0, axis=1)
        self._absorb(X[keep_new], ids[keep_new], ub_new[keep_new], ub_old, None if V is None else V[keep_new])

    def _absorb(self, X, ids, ub_x, ub_old, V):
        """Candidates = retained + X; tighten every bound on that subset; prune below eps."""
        rows = self._rows
        K = np.vstack([rows.live_keys, X])
        ids = np.concatenate([rows.live_ids, ids])
        ub = np.concatenate([ub_old, ub_x])
        if V is not None and rows.V is None:
            rows.V = np.zeros((rows.r, V.shape[1]))
        V = None if rows.V is None else np.vstack([rows.V[: rows.r], V])
        keep = ub >= self._eps
        if keep.any():
            ub[keep] = np.minimum(ub[keep], self._subset_bounds(K[keep], LEWIS_FAST_TOL))
            if int((ub >= self._eps).sum()) > self.max_retained():
                ub[keep] = np.minimum(ub[keep], self._subset_bounds(K[keep], LEWIS_TIGHT_TOL))
            keep &= ub >= self._eps
        rows.set(K[keep], ids[keep], ub[keep], None if V is None else V[keep])

    def _subset_bounds(self, K, tol):
        with warnings.catch_warnings():
            # a non-converged iterate still yields certified (looser) bounds
            warnings.simplefilter("ignore", LewisConvergenceWarning)
            return sensitivity_upper_bounds(K, self._p, rtol=self._rtol, tol=tol)

    # ---------------------------------------------------------------- queries
    def retained(self):
        """The candidates: their ids and keys, and their payload when the sketch carries values.

        Returns
        -------
        rows : tuple
            ``(ids, keys)``: sorted int64 ids of shape (r,) and float64 keys of shape
            (r, d) at the original scale; ``(ids, keys, values)`` with values of shape
            (r, dv) when the sketch carries values.
        """
        ids, K, V = self._retained_rows()
        return (ids, K) if V is None else (ids, K, V)

    def _heavy_entries(self, Q, e, id_map):
        if self._emb is None:
            raise NotImplementedError(
                f"heavy_attention: p={self._p!r} needs the row normaliser sum_l |<q,k_l>|^p: build the sketch "
                "with LpSketch(d, eps, p=..., normalizer=True).")
        Q = np.asarray(check_keys(Q, self._d, caller="heavy_attention", name="Q"), dtype=np.float64)
        with self._lock:
            ids, K, ub, _ = self._rows.sorted()
            S, w = self._emb._terms(Q)
            n, delta = self._n, self._emb.delta
        return heavy.heavy_p(Q, ids, ub, self._f.unscaled(K), S, w, n, self._p, delta, e, id_map)

    # ------------------------------------------------------------------ merge
    def merge(self, other: LpSketch, *, return_changes: bool = False):
        """Fold another LpSketch (built on disjoint ids) into this one; ``other`` is not modified.

        Parameters
        ----------
        other : LpSketch
            Same d, eps, p, rtol and normaliser settings; disjoint ids.
        return_changes : bool, default=False
            Return a :class:`~streamlev.Changes` instead of self.

        Returns
        -------
        self, or Changes when ``return_changes`` is True.
        """
        caller = "LpSketch.merge"
        self._check_other(other, caller)
        mine, theirs = (self._d, self._eps, self._p, self._rtol), (other._d, other._eps, other._p, other._rtol)
        if mine != theirs:
            raise ValueError(f"{caller}: incompatible sketches: this one has (d, eps, p, rtol)={mine}, "
                             f"the other has {theirs}. Only sketches built with the same parameters merge.")
        mine, theirs = _emb_params(self), _emb_params(other)
        if mine != theirs:
            raise ValueError(f"{caller}: incompatible normalizers: this one has (delta, seed, rows)={mine}, "
                             f"the other has {theirs} (None = no normalizer). Build both with the same "
                             "normalizer, delta, seed and normalizer_rows.")
        with locked(self, other):
            if other._n == 0:
                return no_changes() if return_changes else self
            a, b = self._rows.dv, other._rows.dv
            if self._n and a != b:
                raise ValueError(f"{caller}: values have {a} columns here and {b} in the other sketch "
                                 "(None = no values); both sketches must carry the same payload.")
            o_ids = other._rows.live_ids
            check_not_retained(o_ids, self._rows.live_ids, caller, merging=True)
            check_disjoint(self._idr, self._n, self._rows.live_ids, other._idr, other._n, o_ids, caller)
            before = self._rows.live_ids.copy()
            self._merge_state(other)
            self._rows.fit()
            return changes_between(before, self._rows.live_ids, o_ids) if return_changes else self

    @transactional
    def _merge_state(self, other):
        self._rescale(other._f.e)
        shift = other._f.e - self._f.e
        ro = other._rows
        oK = np.ldexp(ro.live_keys, shift)
        self._n += other._n
        ub_old, ub_o = self._rows.live_scores.copy(), ro.live_scores.copy()
        if self._p <= 2.0:
            self._f.R = _factor.update_factor(self._f.R, np.ldexp(other._f.R, shift))
            R = self._f.R
            kappa = _factor.cond_estimate(R)
            half = self._p / 2.0
            if self._rows.r:
                ub_old = np.minimum(ub_old, _factor.score_rows(R, self._rows.live_keys, self._rtol,
                                                               kappa=kappa) ** half)
            if oK.shape[0]:
                ub_o = np.minimum(ub_o, _factor.score_rows(R, oK, self._rtol, kappa=kappa) ** half)
        with _factor.blas_threads(1):
            self._absorb(oK, ro.live_ids.copy(), ub_o, ub_old, None if ro.V is None else ro.V[: ro.r].copy())
            if self._emb is not None:
                self._emb.merge(other._emb)
        self._idr.extend(other._idr.lo, other._idr.hi, other._n)

    # ---------------------------------------------------------- serialization
    def _to_bytes(self) -> bytes:
        """Write this class's fields (see :meth:`Sketch.to_bytes`)."""
        with self._lock:
            ids, K, ub, V = self._rows.sorted()
            extra = {"ub": ub}
            if self._emb is not None:  # optional fields: bytes without them (older sketches) still load
                extra.update(self._emb._fields(_NZ))
            return _format.dump("LpSketch", common_fields(self._d, self._eps, self._p, self._rtol, self._n, self._f.e,
                                                          self._idr, self._f.R, ids, K, extra, V))

    @classmethod
    def _from_bytes(cls, data) -> LpSketch:
        """Parse and check LpSketch bytes (see :meth:`Sketch.from_bytes`)."""
        caller = "LpSketch.from_bytes"
        optional = dict(LpEmbedding._schema(_NZ, dname="d"))
        optional.update(VALUES_SCHEMA)
        f = _format.load(data, "LpSketch", {**COMMON_SCHEMA, "ub": (("r",), "f8")}, optional=optional)
        has = [k for k in f if k.startswith(_NZ)]
        if has and len(has) != len(LpEmbedding._schema(_NZ)):
            raise ValueError(f"{caller}: the normalizer fields are incomplete.")
        try:
            sk = cls(int(f["d"]), float(f["eps"]), p=float(f["p"]), rtol=float(f["rtol"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{caller}: invalid parameters in the header: {exc}") from None
        n, e, R, ids, K, sk._idr, V = load_common(f, sk.max_retained(), caller, positive_diagonal=False)
        ub = f["ub"]
        if ids.size and (np.any(~(ub >= sk._eps)) or np.any(ub > 1.0)):
            raise ValueError(f"{caller}: retained bounds must lie in [eps, 1].")
        sk._n, sk._f.e, sk._f.R = n, e, R
        sk._rows.set(K, ids, ub, V)
        if has:
            emb = LpEmbedding._from_fields(f, _NZ, caller=caller)
            if (emb.d, emb.p, emb.n) != (sk._d, sk._p, n):
                raise ValueError(f"{caller}: the normalizer has (d, p, n)={(emb.d, emb.p, emb.n)}, "
                                 f"the sketch {(sk._d, sk._p, n)}.")
            sk._emb = emb
        return sk


_NZ = "nz_"  # prefix of the optional normalizer fields in LpSketch bytes


def _emb_params(sk):
    e = sk._emb
    return None if e is None else (e.delta, e.seed, e.rows)
