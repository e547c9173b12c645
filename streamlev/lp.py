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
import threading

import numpy as np

from . import _factor, _format
from ._validation import check_dim, check_eps, check_ids, check_keys, check_p
from .embedding import LpEmbedding
from .lewis import sensitivity_upper_bounds
from .reference import DEFAULT_RTOL
from .sketch import (CHUNK_ROWS, _NO_DATA_EXP, _check_id_interval, _check_merge_ids, _check_scaled_state,
                     _checked_id_range, _extend_id_range)

__all__ = ["LpSketch", "universal_set_p"]

_FAST_TOL = 1e-3  # Lewis residual for routine pruning; bounds stay certified whatever the residual
_TIGHT_TOL = 1e-11  # used when loose bounds would exceed the a-priori size bound


class LpSketch:
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

    def __init__(self, d: int, eps: float, *, p: float = 1.0, rtol: float = DEFAULT_RTOL, normalizer: bool = False,
                 delta: float = 0.1, seed: int = 0, normalizer_rows: int | None = None):
        self._d = check_dim(d, caller="LpSketch")
        self._eps = check_eps(eps, caller="LpSketch")
        self._p = check_p(p, caller="LpSketch")
        if not isinstance(rtol, (int, float, np.floating)) or not (0.0 < float(rtol) < 1.0):
            raise ValueError(f"The 'rtol' parameter of LpSketch must be a float in (0, 1). Got {rtol!r}.")
        self._rtol = float(rtol)
        if not isinstance(normalizer, (bool, np.bool_)):
            raise TypeError(f"The 'normalizer' parameter of LpSketch must be True or False. Got {normalizer!r}.")
        self._emb = LpEmbedding(self._d, self._p, delta=delta, seed=seed, rows=normalizer_rows) if normalizer \
            else None
        self._lock = threading.RLock()
        self._n = 0
        self._id_lo, self._id_hi = 0, -1
        self._r = 0  # kept equal to len(_ids) for the shared id checks
        self._e = _NO_DATA_EXP
        self._R = np.zeros((self._d, self._d))
        self._K = np.zeros((0, self._d))
        self._ids = np.zeros(0, dtype=np.int64)
        self._ub = np.zeros(0)

    # ------------------------------------------------------------ properties
    d = property(lambda self: self._d, doc="Key dimension.")
    eps = property(lambda self: self._eps, doc="Threshold the sketch was built for.")
    p = property(lambda self: self._p, doc="Attention exponent.")
    rtol = property(lambda self: self._rtol, doc="Relative ridge of leverage evaluations.")
    n = property(lambda self: self._n, doc="Number of keys seen (including merged sketches).")
    num_retained = property(lambda self: int(self._ids.shape[0]), doc="Candidates held.")
    is_empty = property(lambda self: self._n == 0, doc="True when no key has been seen.")
    normalizer = property(lambda self: self._emb, doc="The LpEmbedding of all keys, or None (normalizer=False).")

    @property
    def nbytes(self) -> int:
        """Bytes held by the sketch's arrays."""
        emb = self._emb.nbytes if self._emb is not None else 0
        return int(self._R.nbytes + self._K.nbytes + self._ids.nbytes + self._ub.nbytes + emb)

    @staticmethod
    def max_retained(d: int, eps: float, p: float = 1.0) -> int:
        """A-priori bound ``floor(d^max(1, p/2) / eps)`` on ``num_retained``."""
        d = check_dim(d, caller="LpSketch.max_retained")
        eps = check_eps(eps, caller="LpSketch.max_retained")
        p = check_p(p, caller="LpSketch.max_retained")
        return int(math.floor(d ** max(1.0, p / 2.0) / eps))

    def __repr__(self) -> str:
        return (f"LpSketch(d={self._d}, eps={self._eps!r}, p={self._p!r}, rtol={self._rtol!r}; "
                f"n={self._n}, num_retained={self.num_retained})")

    # ---------------------------------------------------------------- update
    def update(self, keys, ids=None):
        """Fold a block of keys (m, d) or (d,) into the sketch; returns self.

        ``ids`` default to ``n, n+1, ...``; they must be distinct and differ
        from the retained ids. On any error the sketch is left unchanged.
        """
        with self._lock:
            K = check_keys(keys, self._d, caller="LpSketch.update", check_finite=False)
            m = K.shape[0]
            ids_arr = (np.arange(self._n, self._n + m, dtype=np.int64) if ids is None
                       else check_ids(ids, m, caller="LpSketch.update"))
            if m == 0:
                return self
            if self._ids.size and np.isin(ids_arr, self._ids).any():
                clash = ids_arr[np.isin(ids_arr, self._ids)]
                raise ValueError(f"LpSketch.update: id(s) {clash[:5].tolist()} are already retained by this "
                                 "sketch; ids must be distinct across updates.")
            _check_id_interval(self, ids_arr, "LpSketch.update")
            snap = self._snapshot()
            try:
                with _factor.blas_threads(1):  # many small LAPACK calls: see streamlev._factor.blas_threads
                    for s in range(0, m, CHUNK_ROWS):
                        self._fold(K[s : s + CHUNK_ROWS], ids_arr[s : s + CHUNK_ROWS])
                    if self._emb is not None:
                        self._emb.update(K)
                _extend_id_range(self, ids_arr.min(), ids_arr.max(), m)
            except BaseException:
                self._restore(snap)
                raise
            return self

    def _snapshot(self):
        emb = self._emb._snapshot() if self._emb is not None else None
        return (self._n, self._id_lo, self._id_hi, self._e, self._R, self._K, self._ids, self._ub, emb)

    def _restore(self, snap):
        self._n, self._id_lo, self._id_hi, self._e, self._R, self._K, self._ids, self._ub, emb = snap
        self._r = int(self._ids.shape[0])
        if emb is not None:
            self._emb._restore(emb)

    def _prepare(self, B):
        bmax = max(float(np.max(B)), -float(np.min(B)))  # no temporaries; NaN/Inf propagate
        if not np.isfinite(bmax):
            bad = int((~np.isfinite(B)).any(axis=1).sum())
            raise ValueError(f"LpSketch.update: keys contain NaN or Inf in {bad} rows of a chunk of {B.shape[0]}. "
                             "Remove or fix those rows; the sketch was left unchanged.")
        if bmax == 0.0:
            return np.zeros(B.shape), self._e
        e = max(int(np.frexp(bmax)[1]), self._e)
        X = B.astype(np.float64)
        np.ldexp(X, -e, out=X)
        return X, e

    def _rescale(self, e):
        if e > self._e:
            shift = self._e - e
            self._R = np.ldexp(self._R, shift)
            self._K = np.ldexp(self._K, shift)
            self._e = e

    def _fold(self, B, ids):
        X, e = self._prepare(B)
        self._rescale(e)
        self._n += X.shape[0]
        ub_new = np.ones(X.shape[0])
        ub_old = self._ub.copy()
        if self._p <= 2.0:
            self._R = _factor.update_factor(self._R, X)
            kappa = _factor.cond_estimate(self._R)
            half = self._p / 2.0
            floor = self._eps ** (1.0 / half) * (1.0 - 1e-9)  # tau^(p/2) >= eps  <=>  tau >= eps^(2/p)
            ub_new = np.minimum(ub_new, _factor.score_rows(self._R, X, self._rtol, kappa=kappa, below=floor) ** half)
            if self._K.shape[0]:
                ub_old = np.minimum(ub_old, _factor.score_rows(self._R, self._K, self._rtol, kappa=kappa) ** half)
        nz = np.any(X != 0, axis=1)
        keep_new = (ub_new >= self._eps) & nz
        self._absorb(X[keep_new], ids[keep_new], ub_new[keep_new], ub_old)

    def _absorb(self, X, ids, ub_x, ub_old):
        """Candidates = retained + X; tighten every bound on that subset; prune below eps."""
        K = np.vstack([self._K, X])
        ids = np.concatenate([self._ids, ids])
        ub = np.concatenate([ub_old, ub_x])
        alive = ub >= self._eps
        K, ids, ub = K[alive], ids[alive], ub[alive]
        if ids.size:
            ub = np.minimum(ub, self._subset_bounds(K, _FAST_TOL))
            if int((ub >= self._eps).sum()) > self.max_retained(self._d, self._eps, self._p):
                ub = np.minimum(ub, self._subset_bounds(K, _TIGHT_TOL))
            keep = ub >= self._eps
            K, ids, ub = K[keep], ids[keep], ub[keep]
        self._K, self._ids, self._ub = K, ids, ub
        self._r = int(ids.shape[0])

    def _subset_bounds(self, K, tol):
        import warnings

        from .lewis import LewisConvergenceWarning

        with warnings.catch_warnings():
            # a non-converged iterate still yields certified (looser) bounds
            warnings.simplefilter("ignore", LewisConvergenceWarning)
            return sensitivity_upper_bounds(K, self._p, rtol=self._rtol, tol=tol)

    # ---------------------------------------------------------------- queries
    def scores(self):
        """Retained ids (sorted) and their certified sensitivity upper bounds (each >= eps)."""
        with self._lock:
            order = np.argsort(self._ids, kind="stable")
            return self._ids[order].copy(), self._ub[order].copy()

    def universal_set(self, eps: float | None = None) -> np.ndarray:
        """Sorted int64 ids whose sensitivity bound is >= eps (a superset of ``{j : alpha_j >= eps}``)."""
        with self._lock:
            e = self._eps if eps is None else check_eps(eps, caller="LpSketch.universal_set")
            if e < self._eps:
                raise ValueError(f"LpSketch.universal_set: eps={e!r} is below the sketch's eps={self._eps!r}; "
                                 "keys with smaller bounds were not kept. Build the sketch with a smaller eps.")
            ids, ub = self.scores()
            return ids[ub >= e]

    def retained(self):
        """Retained ids (sorted) and their keys (float64, original scale)."""
        with self._lock:
            order = np.argsort(self._ids, kind="stable")
            return self._ids[order].copy(), np.ldexp(self._K[order], self._e)

    # ------------------------------------------------------------------ merge
    def merge(self, other: LpSketch):
        """Fold another LpSketch (built on disjoint ids) into this one; ``other`` is not modified."""
        if not isinstance(other, LpSketch):
            raise TypeError(f"LpSketch.merge: can only merge another LpSketch, got {type(other).__name__}.")
        if other is self:
            raise ValueError("LpSketch.merge: cannot merge a sketch with itself (its ids are not disjoint).")
        mine, theirs = (self._d, self._eps, self._p, self._rtol), (other._d, other._eps, other._p, other._rtol)
        if mine != theirs:
            raise ValueError(f"LpSketch.merge: incompatible sketches: this one has (d, eps, p, rtol)={mine}, "
                             f"the other has {theirs}. Only sketches built with the same parameters merge.")
        mine, theirs = _emb_params(self), _emb_params(other)
        if mine != theirs:
            raise ValueError(f"LpSketch.merge: incompatible normalizers: this one has (delta, seed, rows)={mine}, "
                             f"the other has {theirs} (None = no normalizer). Build both with the same "
                             "normalizer, delta, seed and normalizer_rows.")
        first, second = (self, other) if id(self) < id(other) else (other, self)
        with first._lock, second._lock:
            if other._n == 0:
                return self
            if self._ids.size and np.isin(other._ids, self._ids).any():
                clash = other._ids[np.isin(other._ids, self._ids)]
                raise ValueError(f"LpSketch.merge: id(s) {clash[:5].tolist()} are retained by both sketches; "
                                 "merged sketches must be built on disjoint ids (pass ids= to update).")
            _check_merge_ids(self, other, "LpSketch.merge")
            snap = self._snapshot()
            try:
                self._rescale(other._e)
                shift = other._e - self._e
                oK = np.ldexp(other._K, shift)
                self._n += other._n
                ub_old, ub_o = self._ub.copy(), other._ub.copy()
                if self._p <= 2.0:
                    self._R = _factor.update_factor(self._R, np.ldexp(other._R, shift))
                    kappa = _factor.cond_estimate(self._R)
                    half = self._p / 2.0
                    if self._K.shape[0]:
                        ub_old = np.minimum(ub_old, _factor.score_rows(self._R, self._K, self._rtol,
                                                                       kappa=kappa) ** half)
                    if oK.shape[0]:
                        ub_o = np.minimum(ub_o, _factor.score_rows(self._R, oK, self._rtol, kappa=kappa) ** half)
                with _factor.blas_threads(1):
                    self._absorb(oK, other._ids.copy(), ub_o, ub_old)
                    if self._emb is not None:
                        self._emb.merge(other._emb)
                _extend_id_range(self, other._id_lo, other._id_hi, other._n)
            except BaseException:
                self._restore(snap)
                raise
            return self

    # ---------------------------------------------------------- serialization
    def to_bytes(self) -> bytes:
        """Serialize to versioned, self-describing, CRC32-checked bytes (no pickle)."""
        with self._lock:
            order = np.argsort(self._ids, kind="stable")
            fields = {
                "d": np.int64(self._d), "eps": np.float64(self._eps), "p": np.float64(self._p),
                "rtol": np.float64(self._rtol), "n": np.int64(self._n), "scale_exp": np.int64(self._e),
                "id_range": np.array([self._id_lo, self._id_hi], dtype=np.int64),
                "R": self._R, "ids": self._ids[order], "keys": self._K[order], "ub": self._ub[order],
            }
            if self._emb is not None:  # optional fields: bytes without them (older sketches) still load
                fields.update(self._emb._fields(_NZ))
            return _format.dump("LpSketch", fields)

    @classmethod
    def from_bytes(cls, data) -> LpSketch:
        """Rebuild a sketch from :meth:`to_bytes` output; raise ValueError on anything else."""
        f = _format.load(data, "LpSketch", {
            "d": ((), "i8"), "eps": ((), "f8"), "p": ((), "f8"), "rtol": ((), "f8"), "n": ((), "i8"),
            "scale_exp": ((), "i8"), "id_range": ((2,), "i8"), "R": (("d", "d"), "f8"), "ids": (("r",), "i8"),
            "keys": (("r", "d"), "f8"), "ub": (("r",), "f8"),
        }, optional=LpEmbedding._schema(_NZ, dname="d"))
        has = [k for k in f if k.startswith(_NZ)]
        if has and len(has) != len(LpEmbedding._schema(_NZ)):
            raise ValueError("LpSketch.from_bytes: the normalizer fields are incomplete.")
        try:
            sk = cls(int(f["d"]), float(f["eps"]), p=float(f["p"]), rtol=float(f["rtol"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"LpSketch.from_bytes: invalid parameters in the header: {exc}") from None
        n, e, ids, ub = int(f["n"]), int(f["scale_exp"]), f["ids"], f["ub"]
        r = ids.shape[0]
        if n < 0 or r > n or r > cls.max_retained(sk._d, sk._eps, sk._p) or not (_NO_DATA_EXP <= e <= 1100):
            raise ValueError(f"LpSketch.from_bytes: inconsistent sizes (n={n}, retained={r}, scale={e}).")
        if not (np.isfinite(f["R"]).all() and np.isfinite(f["keys"]).all()) or np.any(np.tril(f["R"], -1) != 0):
            raise ValueError("LpSketch.from_bytes: the factor or keys are not finite / not upper triangular.")
        _check_scaled_state(f["R"], f["keys"], n, sk._d, "LpSketch.from_bytes")
        if r and (np.any(~(ub >= sk._eps)) or np.any(ub > 1.0)):
            raise ValueError("LpSketch.from_bytes: retained bounds must lie in [eps, 1].")
        if r > 1 and np.any(np.diff(ids) <= 0):
            raise ValueError("LpSketch.from_bytes: retained ids are not sorted and distinct.")
        lo, hi = _checked_id_range(f["id_range"], n, ids, "LpSketch.from_bytes")
        sk._n, sk._id_lo, sk._id_hi, sk._e, sk._R = n, lo, hi, e, np.ascontiguousarray(f["R"])
        sk._K, sk._ids, sk._ub, sk._r = f["keys"], ids, ub, r
        if has:
            emb = LpEmbedding._from_fields(f, _NZ, caller="LpSketch.from_bytes")
            if (emb.d, emb.p, emb.n) != (sk._d, sk._p, n):
                raise ValueError(f"LpSketch.from_bytes: the normalizer has (d, p, n)={(emb.d, emb.p, emb.n)}, "
                                 f"the sketch {(sk._d, sk._p, n)}.")
            sk._emb = emb
        return sk

    def copy(self) -> LpSketch:
        """An independent copy (through the byte format)."""
        return LpSketch.from_bytes(self.to_bytes())

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_from_bytes, (self.to_bytes(),))


def _from_bytes(data):
    return LpSketch.from_bytes(data)


_NZ = "nz_"  # prefix of the optional normalizer fields in LpSketch bytes


def _emb_params(sk):
    e = sk._emb
    return None if e is None else (e.delta, e.seed, e.rows)


def universal_set_p(K, eps: float, *, p: float, rtol: float = DEFAULT_RTOL) -> np.ndarray:
    """Offline superset of ``{j : alpha_j >= eps}`` for |x|^p attention from certified bounds.

    Uses :func:`streamlev.lewis.sensitivity_upper_bounds` (for p <= 2 the
    minimum of the Lewis bound and ``tau^(p/2)``; for p > 2 ``(sum w)^(p/2-1) w``).
    Size <= d^max(1, p/2) / eps.
    """
    K = np.asarray(K)
    if K.ndim != 2:
        raise ValueError(f"universal_set: K must be 2-D of shape (n, d); got shape {K.shape}.")
    K = check_keys(K, K.shape[1], caller="universal_set", name="K")
    if K.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    m = float(np.max(np.abs(K)))
    Ks = np.ldexp(K.astype(np.float64), -int(np.frexp(m)[1])) if m > 0 else K.astype(np.float64)
    ub = sensitivity_upper_bounds(Ks, p, rtol=rtol, tol=_TIGHT_TOL)
    return np.flatnonzero(ub >= eps).astype(np.int64)
