"""Batched rank-one decode step: many stacked p=2 sketches, a few keys each, one compiled loop.

The per-sketch math is that of :mod:`streamlev._kernels.rank_one` (Givens fold
with the augmented unit column, Sherman-Morrison lowering of the retained
scores, exact re-scoring inside the rounding band); what is new is the layout
and that the loop over sketches and tokens runs without Python.

Layout (S sketches, key dimension d, capacity ``cap`` retained keys each):

* ``R`` (S, d (d + 1) / 2) float64: upper-triangular factors, R^T R = K^T K,
  each packed row after row (``rank_one.row_tail``; a full (S, d, d) stack works too).
* ``KT`` (S, d, cap): retained keys stored *transposed* in the caller's
  precision, so the product with all retained keys is a sequence of
  contiguous axpy sweeps (which LLVM vectorizes without fastmath) rather than
  dot products (reductions, which it must not reorder). float32/float64 are
  stored as such; float16 and bfloat16 are stored as their uint16 bits
  (numba has no CPU float16) and converted exactly to float32 here.
* ``ids``, ``tau`` (S, cap); payload ``V`` (S, cap, dv) in the storage bits.

A sketch stops (``status``) when its next key needs the general path
(``GENERAL``: not yet well conditioned, out-of-range key, possibly clashing
id), its buffers are full (``GROW``) or its rank-one rounding band calls for
an exact refresh (``REFRESH``); the caller handles that sketch in numpy and
resumes it at ``start[s]``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import overload

from . import jit
from .rank_one import abs_max, fold_key, lower_scores, row_tail

DONE, GENERAL, REFRESH, GROW = 0, 1, 2, 3
_U = 2.220446049250313e-16
_TWO_112 = 5.192296858534828e33  # 2**112: float16 bits moved into a float32 exponent field, rescaled


def widen(src, out, n, half, tmp):  # pragma: no cover - replaced by the overload inside kernels
    """out[:n] = float64 values of src[:n] (float32/float64, or uint16 bits of float16/bfloat16)."""
    raise NotImplementedError


@overload(widen, jit_options={"cache": True, "nogil": True})
def _widen_impl(src, out, n, half, tmp):
    if isinstance(src.dtype, types.Float):
        def impl(src, out, n, half, tmp):
            for a in range(n):
                out[a] = src[a]
        return impl

    def impl_bits(src, out, n, half, tmp):
        if half:
            # float16 -> float32 with the same bits shifted into place, times 2**112: exact,
            # subnormals included (inputs were checked finite, so no Inf/NaN patterns occur).
            for a in range(n):
                h = np.uint32(src[a])
                tmp[a] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
            f = tmp[:n].view(np.float32)
            for a in range(n):
                out[a] = np.float64(f[a]) * _TWO_112
        else:  # bfloat16 is the top half of a float32
            for a in range(n):
                tmp[a] = np.uint32(src[a]) << np.uint32(16)
            f = tmp[:n].view(np.float32)
            for a in range(n):
                out[a] = f[a]
    return impl_bits


@jit
def widen_row(src, out, n, half, tmp):
    """:func:`widen` callable from Python (for tests and the torch bridge)."""
    widen(src, out, n, half, tmp)


def float_block(Ks, n, half, scratch):  # pragma: no cover - replaced by the overload inside kernels
    """Columns :n of stored keys (d, cap) as a float array: itself for float storage, else float32 scratch."""
    raise NotImplementedError


@overload(float_block, jit_options={"cache": True, "nogil": True})
def _float_block_impl(Ks, n, half, scratch):
    if isinstance(Ks.dtype, types.Float):
        def impl(Ks, n, half, scratch):
            return Ks
        return impl

    def impl_bits(Ks, n, half, scratch):
        # float16 and bfloat16 are exactly float32 values: two vectorizable passes over the bits
        # (shift into a float32 pattern, then rescale float16 by 2**112), instead of widening per row.
        ob = scratch.view(np.uint32)
        for k in range(Ks.shape[0]):
            src = Ks[k]
            o = ob[k]
            if half:
                for a in range(n):
                    h = np.uint32(src[a])
                    o[a] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
            else:
                for a in range(n):
                    o[a] = np.uint32(src[a]) << np.uint32(16)
        if half:
            for k in range(Ks.shape[0]):
                f = scratch[k]
                for a in range(n):
                    f[a] *= np.float32(_TWO_112)
        return scratch
    return impl_bits


@jit
def retained_products(Ks, u, n, c):
    """c[a] = sum_k Ks[k, a] u[k] for a < n (float Ks): axpy sweeps over contiguous rows, four per sweep."""
    d = Ks.shape[0]
    for a in range(n):
        c[a] = 0.0
    k = 0
    while k + 3 < d:
        r0, r1, r2, r3 = Ks[k], Ks[k + 1], Ks[k + 2], Ks[k + 3]
        u0, u1, u2, u3 = u[k], u[k + 1], u[k + 2], u[k + 3]
        for a in range(n):
            c[a] += (u0 * r0[a] + u1 * r1[a]) + (u2 * r2[a] + u3 * r3[a])
        k += 4
    while k < d:
        row = Ks[k]
        uk = u[k]
        for a in range(n):
            c[a] += uk * row[a]
        k += 1


@jit
def back_solve(R, v, u):
    """u = R^{-1} v for upper-triangular R, full (d, d) or packed (see ``rank_one.row_tail``).

    Rows are solved eight at a time: one sweep over the solved tail of u feeds eight
    independent sums (one per row), so the loop is bound by throughput, not by the latency
    of one long chain of additions as a row-by-row dot product is.
    """
    d = v.shape[0]
    i1 = d
    while i1 > 0:
        i0 = max(0, i1 - 8)
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        a4 = 0.0
        a5 = 0.0
        a6 = 0.0
        a7 = 0.0
        if i1 - i0 == 8:
            # row i0 + k from column i1 on: the tail of row i0 + k past its first 8 - k entries
            R0, R1 = row_tail(R, i0, d)[8:], row_tail(R, i0 + 1, d)[7:]
            R2, R3 = row_tail(R, i0 + 2, d)[6:], row_tail(R, i0 + 3, d)[5:]
            R4, R5 = row_tail(R, i0 + 4, d)[4:], row_tail(R, i0 + 5, d)[3:]
            R6, R7 = row_tail(R, i0 + 6, d)[2:], row_tail(R, i0 + 7, d)[1:]
            for jj in range(d - i1):
                uj = u[i1 + jj]
                a0 += R0[jj] * uj
                a1 += R1[jj] * uj
                a2 += R2[jj] * uj
                a3 += R3[jj] * uj
                a4 += R4[jj] * uj
                a5 += R5[jj] * uj
                a6 += R6[jj] * uj
                a7 += R7[jj] * uj
            acc = (a0, a1, a2, a3, a4, a5, a6, a7)
            for k in range(8):
                u[i0 + k] = v[i0 + k] - acc[k]
        else:
            for i in range(i0, i1):
                Ri = row_tail(R, i, d)
                t = 0.0
                for j in range(i1, d):
                    t += Ri[j - i] * u[j]
                u[i] = v[i] - t
        for i in range(i1 - 1, i0 - 1, -1):  # the 8 x 8 triangle of the block itself
            Ri = row_tail(R, i, d)
            t = u[i]
            for j in range(i + 1, i1):
                t -= Ri[j - i] * u[j]
            u[i] = t / Ri[0]
        i1 = i0


@jit
def forward_score(R, k, y):
    """||R^{-T} k||^2 (exact leverage of k without ridge); y is scratch, k is overwritten.

    R : upper triangular, full (d, d) or packed (see ``rank_one.row_tail``).
    """
    d = k.shape[0]
    s = 0.0
    for j in range(d):
        Rj = row_tail(R, j, d)
        yj = k[j] / Rj[0]
        s += yj * yj
        for i in range(j + 1, d):
            k[i] -= yj * Rj[i - j]
    return s


@jit
def _kappa2(k, fro2_now, fro2_ref, smax2):
    # A bound on kappa(R)^2 now from the last exact refresh: sigma_min never decreases as rows
    # arrive, and sigma_max^2 grows by at most the added squared norm (Weyl), from smax2 at the
    # refresh (the exact sigma_max^2 where an SVD was taken, else the lower bound ||R||_F^2 / d).
    return k * k * (1.0 + (fro2_now - fro2_ref) / smax2)


@jit
def _drop(s, a, KT, ids, tau, V, r, new_ids, added, ev_ids, ev_cnt):
    """Swap-remove retained slot a of sketch s; record the id as evicted unless it arrived in this call."""
    g = ids[s, a]
    fresh = False
    for jj in range(new_ids.shape[1]):
        if new_ids[s, jj] == g and added[s, jj]:
            added[s, jj] = False
            fresh = True
            break
    if not fresh:
        ev_ids[s, ev_cnt[s]] = g
        ev_cnt[s] += 1
    last = r[s] - 1
    if a != last:
        for k in range(KT.shape[1]):
            KT[s, k, a] = KT[s, k, last]
        ids[s, a] = ids[s, last]
        tau[s, a] = tau[s, last]
        for k in range(V.shape[2]):
            V[s, a, k] = V[s, last, k]
    r[s] = last


@jit
def decode_block(R, KT, ids, tau, V, r, n, e, steps, kappa, fro2_ref, fro2_now, smax2, id_lo, id_hi, eps,
                 X, Xst, new_ids, XV, half, limits, start, status, added, ev_ids, ev_cnt):
    """Fold keys ``X[s, start[s]:]`` into sketch s for every s, in place, until done or a stop.

    Parameters
    ----------
    R, KT, ids, tau, V : stacked state, see the module docstring; updated in place.
    r, n, e, steps, id_lo, id_hi : (S,) int64; retained count, keys seen, scale exponent (the
        kernel runs only where it is 0), rank-one steps since the last exact refresh, id range.
    kappa, fro2_ref, fro2_now, smax2 : (S,) float64; 2-norm condition number of R and ||R||_F^2
        at the last exact refresh, ||R||_F^2 now, sigma_max(R)^2 (or a lower bound) at the refresh.
    eps : (S,) float64 thresholds.
    X : (S, t, d) float64 keys (exact values of the stored precision); Xst the same in storage bits.
    new_ids : (S, t) int64; XV : (S, t, dv) payload rows in the storage bits (dv may be 0).
    half : bool, uint16 storage holds float16 (True) or bfloat16 (False) bits.
    limits : float64 [kappa_max, margin_refresh, refresh_steps, safe_lo, safe_hi].
    start : (S,) int64 first key to fold; on return the next key not folded.
    status : (S,) int64 out: DONE, GENERAL, REFRESH or GROW.
    added : (S, t) bool, set for new keys retained; ev_ids (S, >= r) int64 / ev_cnt (S,) int64:
        ids retained before the call and evicted by it (appended).
    """
    S, d, cap = KT.shape  # d from the keys: R may be packed
    t = X.shape[1]
    kappa_max, margin_refresh, refresh_steps, safe_lo, safe_hi = limits[0], limits[1], limits[2], limits[3], limits[4]
    k2_max = kappa_max * kappa_max
    min_steps = max(32, d)
    w = np.empty(d)
    v = np.empty(d)
    u = np.empty(d)
    y = np.empty(d)
    col = np.empty(d)
    c = np.empty(cap)
    f32 = np.empty((d, cap), np.float32)
    tmp = np.empty(max(cap, d), np.uint32)
    colst = np.empty(d, KT.dtype)
    for s in range(S):
        status[s] = DONE
        j = start[s]
        Rs = R[s]
        Ks = KT[s]
        while j < t:
            x = X[s, j]
            nid = new_ids[s, j]
            ready = e[s] == 0 and n[s] >= d and kappa[s] <= kappa_max and smax2[s] > 0.0
            if ready:  # (short-circuit: numba raises on a float division by zero)
                ready = _kappa2(kappa[s], fro2_now[s], fro2_ref[s], smax2[s]) <= k2_max
            amax = abs_max(x)
            if not ready or not (safe_lo <= amax < safe_hi) or (id_lo[s] <= nid <= id_hi[s]):
                status[s] = GENERAL
                break
            if r[s] >= cap:
                status[s] = GROW
                break
            rho, tau_x, xx = fold_key(Rs, x, w, v, safe_lo, safe_hi)
            rs = r[s]
            lowest = math.inf
            if rs:
                back_solve(Rs, v, u)
                retained_products(float_block(Ks, rs, half, f32), u, rs, c)
                lowest = lower_scores(tau[s], c, rs, 1.0 / (rho * rho))
            n[s] += 1
            steps[s] += 1
            fro2_now[s] += xx
            st = steps[s]
            k2 = _kappa2(kappa[s], fro2_now[s], fro2_ref[s], smax2[s])
            if not (k2 <= k2_max):  # kappa may have passed the rank-one limit: decide from exact scores
                margin = 1.0
                fresh = 1.0
            else:
                margin = min(1.0, 64.0 * st * _U * k2 * d)
                fresh = min(margin, 64.0 * _U * k2 * d)  # the new key's score has one step of rounding
            es = eps[s]
            if tau_x >= es - fresh:
                p = r[s]
                for k in range(d):
                    Ks[k, p] = Xst[s, j, k]
                ids[s, p] = nid
                tau[s, p] = tau_x
                for k in range(V.shape[2]):
                    V[s, p, k] = XV[s, j, k]
                r[s] = p + 1
                added[s, j] = True
                lowest = min(lowest, tau_x)
            if lowest < es + margin:
                a = r[s] - 1
                while a >= 0:  # from the back: a row swapped into a hole was already judged
                    ta = tau[s, a]
                    drop = False
                    if abs(ta - es) < margin:
                        for k in range(d):
                            colst[k] = Ks[k, a]
                        widen(colst, col, d, half, tmp)
                        ta = forward_score(Rs, col, y)
                        tau[s, a] = ta
                        drop = ta < es
                    elif ta < es:
                        drop = True
                    if drop:
                        _drop(s, a, KT, ids, tau, V, r, new_ids, added, ev_ids, ev_cnt)
                    a -= 1
            if id_hi[s] < id_lo[s]:
                id_lo[s] = nid
                id_hi[s] = nid
            else:
                id_lo[s] = min(id_lo[s], nid)
                id_hi[s] = max(id_hi[s], nid)
            j += 1
            if (margin > margin_refresh and st >= min_steps) or st >= refresh_steps or margin >= 1.0:
                status[s] = REFRESH
                break
        start[s] = j
