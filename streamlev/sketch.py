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
import threading
from typing import NamedTuple

import numpy as np
import scipy.linalg as sla

from . import _factor, _format
from ._bytes_mixin import ByteRoundTrip
from ._kernels.rank_one import abs_max, band_split, fold_key, lower_scores
from ._validation import check_dim, check_eps, check_ids, check_keys, check_values
from .reference import DEFAULT_RTOL

__all__ = ["LevSketch", "Changes"]

CHUNK_ROWS = 4096  # BLAS-3 sweet spot on a small machine (see benchmarks/bench_block.py)
RESCORE_RATIO = 8  # re-score retained keys once 8x as many new rows arrived: <= 1/8 extra scoring work
DECODE_MAX_ROWS = 8  # blocks this small go through the rank-one (decode) path
KAPPA_DECODE = 1e4  # rank-one score updates are used only below this condition number
MARGIN_REFRESH = 1e-6  # exact refresh once the rank-one rounding band is this wide (after >= max(32, d) steps) ...
REFRESH_STEPS = 8192  # ... or after this many rank-one steps, whichever comes first
SVD_MAX_D = 256  # the rank-one path measures kappa with an O(d^3) SVD up to this d
SAFE_EXP = 250  # keys within 2**+-SAFE_EXP are stored unscaled
_SAFE_LO, _SAFE_HI = 2.0 ** -(SAFE_EXP + 1), 2.0**SAFE_EXP  # max |key| with frexp exponent in [-SAFE_EXP, SAFE_EXP]
_U = np.finfo(np.float64).eps
_NO_DATA_EXP = -1100  # scale exponent of an empty sketch (below any float64 exponent)
_NO_IDS = np.zeros(0, np.int64)


class Changes(NamedTuple):
    """Ids that entered and left the retained set during one ``update`` or ``merge``.

    ``added`` are ids of the new keys that are retained after the call;
    ``evicted`` are ids that were retained before the call and are not after it.
    """

    added: np.ndarray
    evicted: np.ndarray


class LevSketch(ByteRoundTrip):
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
    calls on one sketch are serialized and never corrupt it.

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

    def __init__(self, d: int, eps: float, *, p: float = 2.0, rtol: float = DEFAULT_RTOL,
                 blas_threads: int | None = 1):
        self._d = check_dim(d, caller="LevSketch")
        self._eps = check_eps(eps, caller="LevSketch")
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise TypeError(f"The 'p' parameter of LevSketch must be a real number. Got {p!r} instead.")
        if float(p) != 2.0:
            raise ValueError(f"LevSketch implements p=2 (x^2 attention); got p={p!r}. "
                             "Use streamlev.LpSketch for other p.")
        self._p = 2.0
        if not isinstance(rtol, (int, float, np.floating)) or not (0.0 <= float(rtol) < 1.0):
            raise ValueError(f"The 'rtol' parameter of LevSketch must be a float in [0, 1). Got {rtol!r}.")
        self._rtol = float(rtol)
        if blas_threads is not None and (not isinstance(blas_threads, (int, np.integer)) or blas_threads < 1):
            raise ValueError(f"The 'blas_threads' parameter of LevSketch must be None or an int >= 1. "
                             f"Got {blas_threads!r} instead.")
        self._blas_threads = blas_threads
        self._lock = threading.RLock()
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self):
        d = self._d
        self._n = 0
        self._id_lo, self._id_hi = 0, -1  # smallest and largest id seen (to catch reused id ranges)
        self._e = _NO_DATA_EXP  # stored arrays hold true values * 2**-e
        self._R = np.zeros((d, d))
        self._K = np.zeros((0, d))
        self._ids = np.zeros(0, dtype=np.int64)
        self._tau = np.zeros(0)  # upper bounds of the current leverage of retained keys
        self._V = None  # optional (r, dv) payload
        self._r = 0
        self._pending = 0  # rows folded in since the retained scores were last recomputed exactly
        self._sm_steps = 0  # rank-one steps since the last exact refresh
        self._kappa = np.inf  # condition estimate of R at the last exact refresh
        self._kappa_sm = None  # its 2-norm condition number, computed when the rank-one path first needs it
        self._v = None  # scratch of the rank-one path
        self._fro2_ref = 0.0  # ||R||_F^2 at that refresh
        self._fro2_now = 0.0  # ||R||_F^2 now, tracked by the rank-one path

    def _snapshot(self):
        r = self._r
        return (self._n, self._id_lo, self._id_hi, self._e, self._R.copy(), self._K[:r].copy(), self._ids[:r].copy(),
                self._tau[:r].copy(), None if self._V is None else self._V[:r].copy(),
                self._pending, self._sm_steps, self._kappa, self._kappa_sm, self._fro2_ref, self._fro2_now)

    def _restore(self, s):
        (self._n, self._id_lo, self._id_hi, self._e, self._R, self._K, self._ids, self._tau, self._V,
         self._pending, self._sm_steps, self._kappa, self._kappa_sm, self._fro2_ref, self._fro2_now) = s
        self._r = self._ids.shape[0]

    # ------------------------------------------------------------ properties
    @property
    def d(self) -> int:
        """Key dimension."""
        return self._d

    @property
    def eps(self) -> float:
        """Threshold the sketch was built for."""
        return self._eps

    @property
    def p(self) -> float:
        """Attention exponent (2.0)."""
        return self._p

    @property
    def rtol(self) -> float:
        """Relative ridge of the numerical leverage definition."""
        return self._rtol

    @property
    def n(self) -> int:
        """Number of keys seen (including merged sketches)."""
        return self._n

    @property
    def num_retained(self) -> int:
        """Number of keys currently held (always <= ``max_retained(d, eps)``)."""
        return self._r

    @property
    def is_empty(self) -> bool:
        """True when no key has been seen."""
        return self._n == 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the sketch's arrays (factor, keys, ids, scores, payload)."""
        arrays = [self._R, self._K, self._ids, self._tau] + ([] if self._V is None else [self._V])
        return int(sum(a.nbytes for a in arrays))

    @property
    def gram(self) -> np.ndarray:
        """The Gram matrix K^T K of all keys seen, shape (d, d), float64 (a new array)."""
        with self._lock:
            R = np.ldexp(self._R, self._e) if self._n else self._R
            return R.T @ R

    @staticmethod
    def max_retained(d: int, eps: float, p: float = 2.0) -> int:
        """A-priori bound on ``num_retained``: ``floor(d / eps)`` for p = 2.

        Usable before any data arrives: leverage scores sum to rank(K) <= d, so at
        most d/eps keys can have leverage >= eps.
        """
        d = check_dim(d, caller="LevSketch.max_retained")
        eps = check_eps(eps, caller="LevSketch.max_retained")
        return int(math.floor(d / eps))

    def __repr__(self) -> str:
        return (f"LevSketch(d={self._d}, eps={self._eps!r}, p={self._p!r}, rtol={self._rtol!r}; "
                f"n={self._n}, num_retained={self._r})")

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
            fast = self._try_decode(keys, ids, values, return_changes)
            if fast is not None:
                return fast
            K = check_keys(keys, self._d, caller="LevSketch.update", check_finite=False)
            m = K.shape[0]
            if ids is None:
                ids_arr = np.arange(self._n, self._n + m, dtype=np.int64)
            else:
                ids_arr = check_ids(ids, m, caller="LevSketch.update")
            if values is None:
                if self._V is not None and m:
                    raise ValueError("LevSketch.update: this sketch carries values; pass values= with "
                                     f"shape ({m}, {self._V.shape[1]}).")
                V = None
            else:
                if self._V is None and self._n > 0:
                    raise ValueError("LevSketch.update: values were not given for earlier keys; a sketch "
                                     "either carries values for every key or for none.")
                V = check_values(values, m, None if self._V is None else self._V.shape[1],
                                 caller="LevSketch.update")
            if m == 0:
                return Changes(np.zeros(0, np.int64), np.zeros(0, np.int64)) if return_changes else self
            lo, hi = (int(ids_arr[0]),) * 2 if m == 1 else (int(ids_arr.min()), int(ids_arr.max()))
            # retained ids lie in [id_lo, id_hi]: new ids outside it cannot clash (O(1) on the decode path)
            if self._r and lo <= self._id_hi and hi >= self._id_lo and np.isin(ids_arr, self._ids[: self._r]).any():
                clash = ids_arr[np.isin(ids_arr, self._ids[: self._r])]
                raise ValueError(f"LevSketch.update: id(s) {clash[:5].tolist()} are already retained by this "
                                 "sketch; ids must be distinct across updates.")
            if _is_interval(self) and lo <= self._id_hi and hi >= self._id_lo:
                _check_id_interval(self, ids_arr, "LevSketch.update")
            before = self._ids[: self._r].copy() if return_changes else None
            if m <= DECODE_MAX_ROWS and self._decode_ready():
                # Small blocks: everything that can fail is checked before the state changes.
                X, e = self._prepare_block(K)
                if e == self._e:
                    for i in range(m):
                        self._decode_one(X[i], int(ids_arr[i]), None if V is None else V[i : i + 1])
                    _extend_id_range(self, lo, hi, m)
                    return self._changes(before, ids_arr) if return_changes else self
            snap = self._snapshot()
            try:
                with _factor.blas_threads(self._blas_threads if m > DECODE_MAX_ROWS else None):
                    for s in range(0, m, CHUNK_ROWS):
                        t = min(m, s + CHUNK_ROWS)
                        self._fold(K[s:t], ids_arr[s:t], None if V is None else V[s:t])
                    self._enforce_bound()
                _extend_id_range(self, lo, hi, m)
            except BaseException:
                self._restore(snap)
                raise
            if return_changes:
                return self._changes(before, ids_arr)
            return self

    def _changes(self, before, new_ids):
        now = self._ids[: self._r]
        added = np.sort(new_ids[np.isin(new_ids, now)])
        evicted = np.sort(before[~np.isin(before, now)])
        return Changes(added, evicted)

    def _prepare_block(self, B):
        """Check a chunk and return it as float64 with the exponent it needs; mutates nothing.

        Returns (X, e): X = B * 2**-e in float64, e >= the sketch's exponent. Keys whose
        magnitudes lie within 2**+-SAFE_EXP are used as they are (e = 0, no scaling pass):
        their squares and sums of squares stay far inside float64.
        """
        if B.shape[0] == 1:
            amax = abs_max(B[0].astype(np.float64, copy=False))  # one numba call on the decode path
        else:
            hi, lo = float(np.max(B)), float(np.min(B))  # two reductions on the caller's dtype, no temporaries
            amax = max(hi, -lo)
        if not np.isfinite(amax):  # NaN or Inf anywhere propagates into max/min
            bad = int((~np.isfinite(B)).any(axis=1).sum())
            raise ValueError(f"LevSketch.update: keys contain NaN or Inf in {bad} rows of a chunk of {B.shape[0]}. "
                             "Remove or fix those rows; the sketch was left unchanged.")
        if amax == 0.0:
            return np.zeros(B.shape), self._e
        be = int(np.frexp(amax)[1])
        e = max(self._e, be if abs(be) > SAFE_EXP else 0)
        if self._n and be > self._e + 1000:
            diag = np.abs(np.diag(self._R))
            diag = diag[diag > 0]
            if diag.size and np.ldexp(diag.min(), self._e - be) < np.finfo(np.float64).tiny:
                raise ValueError("LevSketch.update: new keys are too large relative to earlier keys for float64 "
                                 f"(block max {amax:.3g} vs sketch scale 2^{self._e}); rescale the input.")
        if e == 0:
            return np.ascontiguousarray(B, dtype=np.float64), e  # no copy for C-ordered float64 input
        X = B.astype(np.float64)
        np.ldexp(X, -e, out=X)
        if be < e - 1000 and np.any(np.any(B != 0, axis=1) & ~np.any(X != 0, axis=1)):
            raise ValueError("LevSketch.update: keys are too small relative to earlier keys for float64 "
                             f"(block max {amax:.3g} vs sketch scale 2^{self._e}); rescale the input.")
        return X, e

    def _rescale(self, new_e):
        shift = self._e - new_e  # <= 0
        if self._n:
            r = self._r
            diag = np.abs(np.diag(self._R))
            tiny = diag[diag > 0]
            if tiny.size and np.ldexp(tiny.min(), shift) < np.finfo(np.float64).tiny:
                raise ValueError("LevSketch: keys are too large relative to earlier keys for float64 "
                                 f"(more than 2^1000 apart; scale exponent {self._e} -> {new_e}).")
            self._R = np.ldexp(self._R, shift)
            self._K = np.ldexp(self._K, shift)
            if r and np.any(np.all(self._K[:r] == 0, axis=1)):
                raise ValueError("LevSketch: keys are too large relative to retained keys for float64.")
            self._fro2_ref = float(np.ldexp(self._fro2_ref, 2 * shift))
            self._fro2_now = float(np.ldexp(self._fro2_now, 2 * shift))
        self._e = new_e

    def _fold(self, B, ids, V):
        X, e = self._prepare_block(B)
        if e > self._e:
            self._rescale(e)
        m = X.shape[0]
        if m <= DECODE_MAX_ROWS and self._pending and self._n >= self._d:
            self._rescore()  # one exact refresh, then the rank-one path can take over
        if m <= DECODE_MAX_ROWS and self._decode_ready():
            for i in range(m):
                self._decode_one(X[i], int(ids[i]), None if V is None else V[i : i + 1])
            return
        self._R, kappa = _factor.update_factor(self._R, X, return_kappa=True)
        self._n += m
        tau_new = _factor.score_rows(self._R, X, self._rtol, kappa=kappa, below=self._eps * (1.0 - 1e-9))
        keep = tau_new >= self._eps
        self._append(X[keep], ids[keep], tau_new[keep], None if V is None else V[keep], V)
        self._pending += m
        if self._r and (self._r - int(keep.sum())) * RESCORE_RATIO <= self._pending:
            self._rescore(kappa)

    # ---- block helpers
    def _append(self, X, ids, tau, V, V_block):
        k = X.shape[0]
        if V_block is not None and self._V is None:
            self._V = np.zeros((self._K.shape[0], V_block.shape[1]))
        if k == 0:
            return
        r = self._r
        need = r + k
        if need > self._K.shape[0]:
            cap = max(need, 2 * self._K.shape[0], 16)
            self._K = _grow(self._K, cap, r)
            self._ids = _grow(self._ids, cap, r)
            self._tau = _grow(self._tau, cap, r)
            if self._V is not None:
                self._V = _grow(self._V, cap, r)
        self._K[r:need] = X
        self._ids[r:need] = ids
        self._tau[r:need] = tau
        if self._V is not None:
            self._V[r:need] = V
        self._r = need

    def _compact(self, keep):
        """Drop the retained keys where ``keep`` is False; returns their ids. The order of the rest may change."""
        drop = np.flatnonzero(~keep)
        if drop.size <= 8:
            return self._drop(drop)
        r = self._r
        gone = self._ids[drop].copy()
        idx = np.flatnonzero(keep)
        k = idx.size
        self._K[:k] = self._K[:r][idx]
        self._ids[:k] = self._ids[:r][idx]
        self._tau[:k] = self._tau[:r][idx]
        if self._V is not None:
            self._V[:k] = self._V[:r][idx]
        self._r = k
        return gone

    def _drop(self, idx):
        """Drop the retained keys at positions idx (a few; any order) by moving the last rows into the holes."""
        idx = np.sort(idx)
        gone = self._ids[idx].copy()
        r = self._r
        for j in idx[::-1].tolist():  # from the back, so every row moved in is one that stays
            r -= 1
            if j != r:
                self._K[j] = self._K[r]
                self._ids[j] = self._ids[r]
                self._tau[j] = self._tau[r]
                if self._V is not None:
                    self._V[j] = self._V[r]
        self._r = r
        return gone

    def _rescore(self, kappa=None):
        """Exact leverage of every retained key w.r.t. all keys seen; prune those below eps."""
        r = self._r
        if kappa is None:
            kappa = _factor.cond_estimate(self._R)
        gone = _NO_IDS
        if r:
            self._tau[:r] = _factor.score_rows(self._R, self._K[:r], self._rtol, kappa=kappa)
            gone = self._compact(self._tau[:r] >= self._eps)
        self._pending = 0
        self._sm_steps = 0
        self._kappa = kappa
        self._kappa_sm = None
        self._fro2_ref = self._fro2_now = float(np.einsum("ij,ij->", self._R, self._R))
        return gone

    def _enforce_bound(self):
        if self._r > self.max_retained(self._d, self._eps):
            self._rescore()

    # ---- decode (rank-one) path
    def _decode_kappa(self) -> float:
        """2-norm condition number of R at the last exact refresh (one SVD per refresh window).

        The 1-norm estimate used by the block path can exceed it by a factor up to d, and the
        rank-one rounding band grows with its square; for d > SVD_MAX_D the estimate is used.
        """
        k = self._kappa_sm
        if k is None:
            k = self._kappa
            if self._d <= SVD_MAX_D and k <= KAPPA_DECODE:
                sv = sla.svdvals(self._R, check_finite=False)
                k = float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf
            self._kappa_sm = k
        return k

    def _decode_kappa2(self):
        """A bound on kappa(R)^2 now when the rank-one path may run, else None."""
        if self._n < self._d or (self._pending and not self._sm_steps) or not self._kappa <= KAPPA_DECODE:
            return None
        # sigma_min never decreases when rows are added and sigma_max^2 grows by at most the added
        # squared norm, while sigma_max^2 >= ||R||_F^2 / d: a bound on kappa^2 from O(1) numbers.
        k = self._decode_kappa()
        kappa2 = k * k * (1.0 + self._d * (self._fro2_now - self._fro2_ref) / self._fro2_ref)
        return kappa2 if kappa2 <= KAPPA_DECODE * KAPPA_DECODE else None

    def _decode_ready(self) -> bool:
        return self._decode_kappa2() is not None

    def _try_decode(self, keys, ids, values, return_changes):
        """The one-key update without the general machinery, or None when the key needs the general path."""
        plan = self._decode_plan(keys, ids, values, check_range=False)
        if plan is None:
            return None
        return self._decode_apply(plan, return_changes, _SAFE_LO, _SAFE_HI)

    def _decode_plan(self, keys, ids, values, *, check_range: bool):
        """(x, id, payload) when a one-key update can take the rank-one fast path, else None; mutates nothing.

        Takes only the plain case (one float key of shape (d,) in the unscaled range, a default
        or fresh integer id, a payload row exactly when the sketch carries payloads); everything
        else returns None and the general path then validates and reports errors. Without
        ``check_range`` the key's values are checked by the kernel in :meth:`_decode_apply`.
        """
        if type(keys) is not np.ndarray or keys.shape != (self._d,) or keys.dtype.kind != "f" \
                or (values is None) != (self._V is None) or self._e != 0 or self._decode_kappa2() is None:
            return None
        if ids is None:
            nid = self._n
        elif isinstance(ids, (int, np.integer)) and not isinstance(ids, (bool, np.bool_)) \
                and -(2**63) <= int(ids) < 2**63:
            nid = int(ids)
        else:
            return None
        if self._id_lo <= nid <= self._id_hi:
            return None  # may clash with a retained or already used id: the general path checks it
        V = None if values is None else check_values(values, 1, self._V.shape[1], caller="LevSketch.update")
        x = keys if keys.dtype == np.float64 and keys.flags.c_contiguous else np.ascontiguousarray(keys, np.float64)
        if check_range and not (_SAFE_LO <= abs_max(x) < _SAFE_HI):  # also NaN, Inf and all-zero keys
            return None
        return x, nid, V

    def _decode_apply(self, plan, return_changes, lo=0.0, hi=math.inf):
        """Run a plan from :meth:`_decode_plan`; None (nothing changed) if the kernel refuses the key."""
        x, nid, V = plan
        gone = self._decode_one(x, nid, V, lo, hi)
        if gone is None:
            return None
        _extend_id_range(self, nid, nid, 1)
        if not return_changes:
            return self
        added = bool(np.any(self._ids[: self._r] == nid))  # a new id that is retained now was just added
        return Changes(np.array([nid] if added else [], np.int64), np.sort(gone[gone != nid]))

    def _decode_one(self, x, nid, V, lo=0.0, hi=math.inf):
        """Fold one key (scaled float64) in with the rank-one path; returns the ids evicted (int64 array).

        Returns None, with nothing changed, when max|x| is outside [lo, hi) or x has a NaN.

        Notes
        -----
        The Givens sweep gives the new factor R', v = R'^{-T} x and rho = 1/sqrt(1 + h) with
        h = x^T G^{-1} x (G the Gram matrix before x). Each retained score then drops by the
        Sherman-Morrison amount (k . G^{-1} x)^2 / (1 + h) = (k . u)^2 / rho^2 with u = R'^{-1} v:
        one triangular solve and one matrix-vector product, O(d^2 + r d) per key.
        """
        d = self._d
        if self._v is None:
            self._v, self._w = np.empty(d), np.empty(d)
        v = self._v
        R = self._R
        rho, tau_x, xx = fold_key(R, x, self._w, v, lo, hi)
        if rho < 0.0:
            return None  # refused by the kernel's range check: nothing changed
        r = self._r
        lowest = math.inf
        if r:
            lowest = lower_scores(self._tau, self._K[:r] @ _factor.solve_upper(R, v), r, 1.0 / (rho * rho))
        self._n += 1
        steps = self._sm_steps = self._sm_steps + 1
        self._fro2_now += xx
        # Rank-one updates accumulate rounding ~ steps * u * kappa^2; decide only outside that band.
        kappa2 = self._decode_kappa2()
        if kappa2 is None:  # kappa may have grown past the rank-one limit: every decision from exact scores
            margin = fresh = 1.0
        else:
            margin = min(1.0, 64.0 * steps * _U * kappa2 * d)
            fresh = min(margin, 64.0 * _U * kappa2 * d)  # the new key's score has one step of rounding
        eps = self._eps
        if tau_x >= eps - fresh:
            self._append(x[None, :], np.array([nid], np.int64), np.array([tau_x]), V, V)
            lowest = min(lowest, tau_x)
        gone = _NO_IDS
        if lowest < eps + margin:
            near, low = band_split(self._tau, self._r, eps, margin)
            if near.size:
                tau_near = _factor.score_few(R, self._K[near])
                self._tau[near] = tau_near
                low = np.concatenate([low, near[tau_near < eps]])
            if low.size:
                gone = self._drop(low)
        if (margin > MARGIN_REFRESH and steps >= max(32, d)) or steps >= REFRESH_STEPS or margin >= 1.0:
            more = self._rescore()
            if more.size:
                gone = np.concatenate([gone, more])
        return gone

    # ---------------------------------------------------------------- queries
    def _refresh(self):
        if self._pending or self._sm_steps:
            with _factor.blas_threads(self._blas_threads):
                self._rescore()

    def scores(self):
        """Retained ids and their exact leverage with respect to all keys seen.

        Returns
        -------
        ids : ndarray of shape (r,), int64, sorted
        tau : ndarray of shape (r,), float64, each >= eps
        """
        with self._lock:
            self._refresh()
            r = self._r
            order = np.argsort(self._ids[:r], kind="stable")
            return self._ids[:r][order].copy(), self._tau[:r][order].copy()

    def universal_set(self, eps: float | None = None) -> np.ndarray:
        """Sorted int64 ids of the keys with leverage >= eps (default ``self.eps``).

        ``eps`` must be >= the sketch's eps: keys below it were discarded.
        """
        with self._lock:
            e = self._eps if eps is None else check_eps(eps, caller="LevSketch.universal_set")
            if e < self._eps:
                raise ValueError(f"LevSketch.universal_set: eps={e!r} is below the sketch's eps={self._eps!r}; "
                                 "keys with smaller leverage were not kept. Build the sketch with a smaller eps.")
            ids, tau = self.scores()
            return ids[tau >= e]

    def retained(self):
        """Retained ids (sorted), their keys (float64, original scale) and payload values (or None).

        Returns
        -------
        ids : ndarray of shape (r,), int64
        keys : ndarray of shape (r, d), float64
        values : ndarray of shape (r, dv) or None
        """
        with self._lock:
            self._refresh()
            r = self._r
            order = np.argsort(self._ids[:r], kind="stable")
            keys = np.ldexp(self._K[:r][order], self._e)
            vals = None if self._V is None else self._V[:r][order].copy()
            return self._ids[:r][order].copy(), keys, vals

    def _score_external(self, K, chunk):
        """Leverage of arbitrary rows (original scale) w.r.t. all keys seen; used by the offline API."""
        kappa = _factor.cond_estimate(self._R)
        out = np.empty(K.shape[0])
        for s in range(0, K.shape[0], chunk):
            X = np.ldexp(K[s : s + chunk].astype(np.float64), -self._e)
            out[s : s + chunk] = _factor.score_rows(self._R, X, self._rtol, kappa=kappa)
        return out

    # -------------------------------------------------------------- attention
    def heavy_attention(self, Q, eps: float | None = None):
        """Every (query, key) pair with x^2 attention >= eps over all keys seen; see :mod:`streamlev.attention`."""
        from .attention import heavy_attention

        return heavy_attention(self, Q, eps)

    # ------------------------------------------------------------------ merge
    def _check_compatible(self, other, caller):
        if not isinstance(other, LevSketch):
            raise TypeError(f"{caller}: can only merge another LevSketch, got {type(other).__name__}.")
        mine = (self._d, self._eps, self._p, self._rtol)
        theirs = (other._d, other._eps, other._p, other._rtol)
        if mine != theirs:
            raise ValueError(f"{caller}: incompatible sketches: this one has (d, eps, p, rtol)={mine}, "
                             f"the other has {theirs}. Only sketches built with the same parameters merge.")
        if other._n and self._n and (self._V is None) != (other._V is None):
            raise ValueError(f"{caller}: one sketch carries values and the other does not.")
        if self._V is not None and other._V is not None and self._V.shape[1] != other._V.shape[1]:
            raise ValueError(f"{caller}: values have {self._V.shape[1]} columns here and "
                             f"{other._V.shape[1]} in the other sketch.")

    def merge(self, other: LevSketch, *, return_changes: bool = False):
        """Fold another sketch (built on disjoint keys) into this one; ``other`` is not modified.

        The result is exactly the sketch of the union of both key sets.

        Returns
        -------
        self, or Changes when ``return_changes`` is True (``added`` holds the
        other sketch's ids that are retained).
        """
        if not isinstance(other, LevSketch):
            raise TypeError(f"LevSketch.merge: can only merge another LevSketch, got {type(other).__name__}.")
        if other is self:
            raise ValueError("LevSketch.merge: cannot merge a sketch with itself (its ids are not disjoint).")
        first, second = (self, other) if id(self) < id(other) else (other, self)
        with first._lock, second._lock:
            self._check_compatible(other, "LevSketch.merge")
            if other._n == 0:
                return Changes(np.zeros(0, np.int64), np.zeros(0, np.int64)) if return_changes else self
            ro = other._r
            o_ids = other._ids[:ro]
            if self._r and ro and np.isin(o_ids, self._ids[: self._r]).any():
                clash = o_ids[np.isin(o_ids, self._ids[: self._r])]
                raise ValueError(f"LevSketch.merge: id(s) {clash[:5].tolist()} are retained by both sketches; "
                                 "merged sketches must be built on disjoint ids (pass ids= to update).")
            _check_merge_ids(self, other, "LevSketch.merge")
            before = self._ids[: self._r].copy() if return_changes else None
            snap = self._snapshot()
            try:
                with _factor.blas_threads(self._blas_threads):
                    self._merge_state(other, ro, o_ids)
            except BaseException:
                self._restore(snap)
                raise
            if return_changes:
                return self._changes(before, o_ids)
            return self

    def _merge_state(self, other, ro, o_ids):
        if other._e > self._e:
            self._rescale(other._e)
        oR = np.ldexp(other._R, other._e - self._e)
        oK = np.ldexp(other._K[:ro], other._e - self._e)
        if self._n == 0:
            self._R = np.zeros_like(self._R)
        self._R = _factor.update_factor(self._R, oR)
        self._n += other._n
        _extend_id_range(self, other._id_lo, other._id_hi, other._n)
        oV = None if other._V is None else other._V[:ro].copy()
        self._append(oK, o_ids.copy(), np.ones(ro), oV, oV)
        self._rescore()

    # ---------------------------------------------------------- serialization
    def to_bytes(self) -> bytes:
        """Serialize to versioned, self-describing bytes (no pickle; CRC32-checked).

        Equal sketches give equal bytes: retained keys are written sorted by id.
        """
        with self._lock:
            self._refresh()
            ids, keys_scaled, vals = self._canonical()
            fields = {
                "d": np.int64(self._d), "eps": np.float64(self._eps), "p": np.float64(self._p),
                "rtol": np.float64(self._rtol), "n": np.int64(self._n), "scale_exp": np.int64(self._e),
                "id_range": np.array([self._id_lo, self._id_hi], dtype=np.int64),
                "R": self._R, "ids": ids, "keys": keys_scaled,
            }
            if vals is not None:
                fields["values"] = vals
            return _format.dump("LevSketch", fields)

    def _canonical(self):
        r = self._r
        order = np.argsort(self._ids[:r], kind="stable")
        vals = None if self._V is None else self._V[:r][order]
        return self._ids[:r][order], self._K[:r][order], vals

    @classmethod
    def from_bytes(cls, data) -> LevSketch:
        """Rebuild a sketch from :meth:`to_bytes` output; raise ValueError on anything else."""
        f = _format.load(data, "LevSketch", {
            "d": ((), "i8"), "eps": ((), "f8"), "p": ((), "f8"), "rtol": ((), "f8"), "n": ((), "i8"),
            "scale_exp": ((), "i8"), "id_range": ((2,), "i8"), "R": (("d", "d"), "f8"), "ids": (("r",), "i8"),
            "keys": (("r", "d"), "f8"),
        }, optional={"values": (("r", None), "f8")})
        try:
            sk = cls(int(f["d"]), float(f["eps"]), p=float(f["p"]), rtol=float(f["rtol"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"LevSketch.from_bytes: invalid parameters in the header: {exc}") from None
        n, e, R, ids, K = int(f["n"]), int(f["scale_exp"]), f["R"], f["ids"], f["keys"]
        r = ids.shape[0]
        if n < 0 or r > n or r > cls.max_retained(sk._d, sk._eps) or not (_NO_DATA_EXP <= e <= 1100):
            raise ValueError(f"LevSketch.from_bytes: inconsistent sizes (n={n}, retained={r}, scale={e}).")
        if not (np.isfinite(R).all() and np.isfinite(K).all()) or np.any(np.tril(R, -1) != 0) \
                or np.any(np.diag(R) < 0):
            raise ValueError("LevSketch.from_bytes: the factor R is not a finite upper-triangular matrix "
                             "with a non-negative diagonal.")
        _check_scaled_state(R, K, n, sk._d, "LevSketch.from_bytes")
        if r > 1 and np.any(np.diff(ids) <= 0):
            raise ValueError("LevSketch.from_bytes: retained ids are not sorted and distinct.")
        sk._id_lo, sk._id_hi = _checked_id_range(f["id_range"], n, ids, "LevSketch.from_bytes")
        V = f.get("values")
        if V is not None and not np.isfinite(V).all():
            raise ValueError("LevSketch.from_bytes: values contain NaN or Inf.")
        sk._n, sk._e, sk._R = n, e, np.ascontiguousarray(R)
        sk._K, sk._ids, sk._tau = K.copy(), ids.copy(), np.ones(r)
        sk._V = None if V is None else V.copy()
        sk._r = r
        if n:
            sk._rescore()
        return sk


# Ids of evicted keys are not stored (bounded memory), but when a sketch's ids are
# exactly the interval [lo, hi] (the default running positions, or one shard's row
# range) any id inside it is known to be taken. That catches the common mistake of
# merging two sketches that both counted ids from 0.
def _is_interval(sk) -> bool:
    return sk._n > 0 and sk._id_hi - sk._id_lo + 1 == sk._n


def _check_id_interval(sk, ids, caller):
    if _is_interval(sk):
        inside = ids[(ids >= sk._id_lo) & (ids <= sk._id_hi)]
        if inside.size:
            raise ValueError(f"{caller}: id(s) {inside[:5].tolist()} were already used: this sketch has seen exactly "
                             f"the ids {sk._id_lo}..{sk._id_hi}. Pass fresh ids (e.g. ids=np.arange(n0, n0 + m)).")


def _check_merge_ids(sk, other, caller):
    both = _is_interval(sk) and _is_interval(other)
    if both and sk._id_lo <= other._id_hi and other._id_lo <= sk._id_hi:
        raise ValueError(f"{caller}: the sketches' ids overlap: this one has seen ids {sk._id_lo}..{sk._id_hi}, "
                         f"the other {other._id_lo}..{other._id_hi}. Build shards with disjoint ids "
                         "(update(keys, ids=offset + np.arange(m))).")
    for a, b in ((sk, other), (other, sk)):
        if _is_interval(a) and b._r:
            ids = b._ids[: b._r] if hasattr(b, "_r") else b._ids
            _check_id_interval(a, ids, caller)


def _checked_id_range(id_range, n, ids, caller):
    """Decoded (lo, hi) after checking it can describe n distinct ids that include the retained ones."""
    lo, hi = (int(v) for v in id_range)
    if (n == 0 and (lo, hi) != (0, -1)) or (n > 0 and (hi < lo or hi - lo + 1 < n)) \
            or (ids.size and (ids[0] < lo or ids[-1] > hi)):
        raise ValueError(f"{caller}: id range [{lo}, {hi}] is inconsistent with n={n} and the ids.")
    return lo, hi


def _extend_id_range(sk, lo, hi, count):
    if count <= 0:
        return
    if sk._id_hi < sk._id_lo:
        sk._id_lo, sk._id_hi = int(lo), int(hi)
    else:
        sk._id_lo, sk._id_hi = min(sk._id_lo, int(lo)), max(sk._id_hi, int(hi))


def _check_scaled_state(R, K, n, d, caller):
    # Stored keys are scaled below 2**(SAFE_EXP+1) in absolute value and R^T R is their Gram
    # matrix, so a genuine sketch has |K| < 2**(SAFE_EXP+1) and ||R||_F^2 <= n d 4**(SAFE_EXP+1).
    top = 2.0 ** (SAFE_EXP + 1)
    with np.errstate(over="ignore"):  # an overflow here is exactly what this check reports
        fro2 = float(np.sum((R / top) ** 2))
    if K.size and float(np.max(np.abs(K))) >= top:
        raise ValueError(f"{caller}: stored keys exceed the scaled range; the bytes were not written by streamlev.")
    if not np.isfinite(fro2) or fro2 > n * d * (1.0 + 1e-6):
        raise ValueError(f"{caller}: the factor's norm ({fro2:.3g}) exceeds what {n} scaled keys of dimension {d} "
                         "can produce; the bytes are corrupt.")


def _grow(a, cap, r):
    out = np.zeros((cap,) + a.shape[1:], dtype=a.dtype)
    out[:r] = a[:r]
    return out
