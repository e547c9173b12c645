"""The decode step of LevSketch: one key folded in with a rank-one update, O(d^2 + r d).

:class:`DecodeStep` is mixed into :class:`streamlev.LevSketch`; it owns the
rank-one bookkeeping (steps since the last exact refresh, condition bounds,
Frobenius norms) and decides, per key, whether its scores can be trusted or
must be recomputed exactly. :func:`plan_one` / :func:`apply_plan` split a
one-key update into a check that mutates nothing and an application that cannot
fail, which is what :class:`streamlev.MultiHeadSketch` needs to update every head
atomically without snapshots.
"""

from __future__ import annotations

import math

import numpy as np

from . import _constants as C
from . import _factor
from ._kernels.rank_one import abs_max, band_split, fold_key, lower_scores
from ._sketch_base import Changes
from ._validation import check_values

__all__ = ["DecodeStep", "DecodeState", "plan_one", "apply_plan", "NO_IDS"]

NO_IDS = np.zeros(0, np.int64)


class DecodeState:
    """Rank-one bookkeeping between two exact refreshes (plain numbers; copied by snapshots)."""

    __slots__ = ("steps", "kappa", "kappa_sm", "smax2", "dead", "phantom", "fro2_ref", "fro2_now")

    def __init__(self):
        self.steps = 0  # rank-one steps since the last exact refresh
        self.kappa = math.inf  # condition estimate of R at the last exact refresh
        self.kappa_sm = None  # its 2-norm condition number, computed when the rank-one path first needs it
        self.smax2 = None  # sigma_max(R)^2 at that refresh, when the SVD gave kappa_sm
        self.dead = None  # indices of coordinates no key has touched (zero row and column of R), or None
        self.phantom = 0.0  # diagonal stand-in for those coordinates during a rank-one step (sigma_max)
        self.fro2_ref = 0.0  # ||R||_F^2 at that refresh
        self.fro2_now = 0.0  # ||R||_F^2 now, tracked by the rank-one path

    def state(self) -> tuple:
        return (self.steps, self.kappa, self.kappa_sm, self.smax2, self.dead, self.phantom, self.fro2_ref,
                self.fro2_now)

    def set(self, s: tuple) -> None:
        (self.steps, self.kappa, self.kappa_sm, self.smax2, self.dead, self.phantom, self.fro2_ref,
         self.fro2_now) = s

    def refreshed(self, kappa: float, fro2: float) -> None:
        self.steps, self.kappa, self.kappa_sm, self.smax2, self.dead = 0, kappa, None, None, None
        self.fro2_ref = self.fro2_now = fro2

    def invalidate(self) -> None:
        """R was changed by the general path: no rank-one step until the next :meth:`refreshed`.

        (The path runs only while ``steps > 0`` or nothing is pending; the bounds, the untouched
        coordinates and ||R||_F^2 kept here describe the R of the last refresh plus rank-one steps.)
        """
        self.steps, self.kappa_sm, self.smax2, self.dead = 0, None, None, None

    def rescaled(self, shift: int) -> None:
        if self.smax2 is not None:
            self.smax2 = float(np.ldexp(self.smax2, 2 * shift))
            self.phantom = float(np.ldexp(self.phantom, shift))
        self.fro2_ref = float(np.ldexp(self.fro2_ref, 2 * shift))
        self.fro2_now = float(np.ldexp(self.fro2_now, 2 * shift))


class DecodeStep:
    """Rank-one path of LevSketch (mixin; reads the sketch's factor, rows and decode state)."""

    def _decode_kappa(self) -> float:
        """2-norm condition number of R at the last exact refresh (one SVD per refresh window).

        The 1-norm estimate used by the block path can exceed it by a factor up to d, and the
        rank-one rounding band grows with its square; for d > SVD_MAX_D the estimate is used.
        """
        ds = self._dec
        k = ds.kappa_sm
        if k is None:
            k = ds.kappa
            if self._d <= C.SVD_MAX_D:  # (_decode_kappa2 has ruled out an estimate that proves kappa too large)
                k, smax, dead = _factor.live_condition(self._f.R)
                ds.smax2 = smax * smax
                ds.dead, ds.phantom = (dead, smax) if dead.size else (None, 0.0)
            ds.kappa_sm = k
        return k

    def _decode_kappa2(self):
        """A bound on kappa(R)^2 now when the rank-one path may run, else None."""
        ds = self._dec
        if self._d <= C.SVD_MAX_D:  # the SVD decides below d KAPPA_DECODE, and on untouched coordinates
            far = not (ds.kappa <= C.KAPPA_DECODE * self._d or math.isinf(ds.kappa))
        else:
            far = not ds.kappa <= C.KAPPA_DECODE
        if self._n < self._d or (self._pending and not ds.steps) or far:
            return None
        # sigma_min never decreases when rows are added and sigma_max^2 grows by at most the added
        # squared norm (Weyl), so kappa^2 <= kappa_ref^2 (1 + added / sigma_max^2): O(1) numbers. Without
        # the SVD's sigma_max, ||R||_F^2 / d <= sigma_max^2 stands in (up to d times looser).
        k = self._decode_kappa()
        if not k < math.inf:
            return None
        smax2 = ds.smax2 if ds.smax2 is not None else ds.fro2_ref / self._d
        kappa2 = k * k * (1.0 + (ds.fro2_now - ds.fro2_ref) / smax2)
        return kappa2 if kappa2 <= C.KAPPA_DECODE * C.KAPPA_DECODE else None

    def _decode_ready(self) -> bool:
        return self._decode_kappa2() is not None

    def _try_decode(self, keys, ids, values, return_changes):
        """The one-key update without the general machinery, or None when the key needs the general path."""
        plan = plan_one(self, keys, ids, values, check_range=False)
        return None if plan is None else apply_plan(self, plan, return_changes, C.SAFE_LO, C.SAFE_HI)

    def _decode_small_block(self, K, ids, V) -> bool:
        """Fold a block of <= 8 keys key by key on the rank-one path; False (nothing changed) if it cannot."""
        if not self._decode_ready():
            return False
        X, e = self._f.prepare(K, self._n > 0, "LevSketch.update")  # everything that can fail, before changes
        if e != self._f.e or self._touches_dead(X):
            return False
        for i in range(K.shape[0]):
            self._decode_one(X[i], int(ids[i]), None if V is None else V[i : i + 1])
        return True

    def _decode_chunk(self, X, ids, V) -> bool:
        """Inside the block path: fold a small scaled chunk key by key when the rank-one path may run."""
        if self._pending and self._n >= self._d:
            self._rescore()  # one exact refresh, then the rank-one path can take over
        if not self._decode_ready() or self._touches_dead(X):
            return False
        for i in range(X.shape[0]):
            self._decode_one(X[i], int(ids[i]), None if V is None else V[i : i + 1])
        return True

    def _touches_dead(self, X) -> bool:
        """Whether a key of X has a nonzero on a coordinate no key has touched (the rank-one path refuses it)."""
        dead = self._dec.dead
        return dead is not None and bool(X[:, dead].any())

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
        R = self._f.R
        rows, ds = self._rows, self._dec
        dead = ds.dead
        if dead is not None:
            if x[dead].any():
                return None  # the key touches an untouched coordinate: the general path refactors
            # A zero row and column of R stand for a coordinate no key has touched. A positive diagonal
            # there (sigma_max, so kappa is the live block's) makes R invertible and changes nothing
            # else: every Givens rotation and solve sees x_j = 0 on it. It is removed right after.
            R[dead, dead] = ds.phantom
        try:
            rho, tau_x, xx = fold_key(R, x, self._w, v, lo, hi)
            if rho < 0.0:
                return None  # refused by the kernel's range check: nothing changed
            r = rows.r
            lowest = math.inf
            if r:
                lowest = lower_scores(rows.score, rows.K[:r] @ _factor.solve_upper(R, v), r, 1.0 / (rho * rho))
            gone, margin = self._decide_one(x, nid, V, tau_x, xx, lowest)
        finally:
            if dead is not None:
                R[dead, dead] = 0.0
        if (margin > C.MARGIN_REFRESH and ds.steps >= max(32, d)) or ds.steps >= C.REFRESH_STEPS or margin >= 1.0:
            more = self._rescore()
            if more.size:
                gone = np.concatenate([gone, more])
        return gone

    def _decide_one(self, x, nid, V, tau_x, xx, lowest):
        """After the fold: append the new key if it is heavy, drop retained keys that fell below eps.

        Returns the ids dropped and the rounding margin of the scores after this step.
        """
        d, R, rows, ds = self._d, self._f.R, self._rows, self._dec
        self._n += 1
        steps = ds.steps = ds.steps + 1
        ds.fro2_now += xx
        # Rank-one updates accumulate rounding ~ steps * u * kappa^2; decide only outside that band.
        kappa2 = self._decode_kappa2()
        if kappa2 is None:  # kappa may have grown past the rank-one limit: every decision from exact scores
            margin = fresh = 1.0
        else:
            margin = min(1.0, 64.0 * steps * C.U * kappa2 * d)
            fresh = min(margin, 64.0 * C.U * kappa2 * d)  # the new key's score has one step of rounding
        eps = self._eps
        if tau_x >= eps - fresh:
            rows.append(x[None, :], np.array([nid], np.int64), np.array([tau_x]), V, V)
            lowest = min(lowest, tau_x)
        gone = NO_IDS
        if lowest < eps + margin:
            near, low = band_split(rows.score, rows.r, eps, margin)
            if near.size:
                tau_near = _factor.score_few(R, rows.K[near])
                rows.score[near] = tau_near
                low = np.concatenate([low, near[tau_near < eps]])
            if low.size:
                gone = rows.drop(low)
        return gone, margin


def plan_one(sk, keys, ids, values, *, check_range: bool):
    """(x, id, payload) when a one-key update of ``sk`` can take the rank-one fast path, else None.

    Mutates nothing. Takes only the plain case (one float key of shape (d,) in the unscaled
    range, a default or fresh integer id, a payload row exactly when the sketch carries
    payloads); everything else returns None and the general path then validates and reports
    errors. Without ``check_range`` the key's values are checked by the kernel in :func:`apply_plan`.
    """
    rV = sk._rows.V
    if type(keys) is not np.ndarray or keys.shape != (sk._d,) or keys.dtype.kind != "f" \
            or (values is None) != (rV is None) or sk._f.e != 0 or sk._decode_kappa2() is None:
        return None
    if ids is None:
        nid = sk._n
    elif isinstance(ids, (int, np.integer)) and not isinstance(ids, (bool, np.bool_)) \
            and -(2**63) <= int(ids) < 2**63:
        nid = int(ids)
    else:
        return None
    idr = sk._idr
    if idr.lo <= nid <= idr.hi:
        return None  # may clash with a retained or already used id: the general path checks it
    V = None if values is None else check_values(values, 1, rV.shape[1], caller="LevSketch.update")
    x = keys if keys.dtype == np.float64 and keys.flags.c_contiguous else np.ascontiguousarray(keys, np.float64)
    if check_range and not (C.SAFE_LO <= abs_max(x) < C.SAFE_HI):  # also NaN, Inf and all-zero keys
        return None
    return x, nid, V


def apply_plan(sk, plan, return_changes: bool, lo: float = 0.0, hi: float = math.inf):
    """Run a plan from :func:`plan_one`; None (nothing changed) if the kernel refuses the key."""
    x, nid, V = plan
    gone = sk._decode_one(x, nid, V, lo, hi)
    if gone is None:
        return None
    sk._idr.extend(nid, nid, 1)
    if not return_changes:
        return sk
    added = bool(np.any(sk._rows.live_ids == nid))  # a new id that is retained now was just added
    return Changes(np.array([nid] if added else [], np.int64), np.sort(gone[gone != nid]))
