"""Rank-one (one key at a time) updates of the triangular factor and of leverage scores."""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.extending import overload

from . import jit


def row_tail(R, i, d):  # pragma: no cover - replaced by the overload inside kernels
    """Row i of an upper-triangular factor from its diagonal on: ``R[i, i:]``, length d - i.

    R is either a full (d, d) C-contiguous array or the packed upper triangle, rows one
    after the other (shape (d (d + 1) / 2,), the layout of ``R[np.triu_indices(d)]``),
    which halves the memory of a factor. Every kernel below touches R only through
    these contiguous row tails, so one source serves both layouts.
    """
    raise NotImplementedError


@overload(row_tail, jit_options={"cache": True, "nogil": True})
def _row_tail_impl(R, i, d):
    if isinstance(R, types.Array) and R.ndim == 2:
        return lambda R, i, d: R[i, i:]

    def packed(R, i, d):
        off = i * d - (i * (i - 1)) // 2
        return R[off : off + d - i]
    return packed


@jit
def _rotation(p, q):
    """(r, c, s) with r = sqrt(p^2 + q^2) and [c s; -s c] (p, q) = (r, 0)."""
    r = math.sqrt(p * p + q * q)
    if not (1e-150 < r < 1e150):  # squares near under/overflow: take the slow exact path
        r = math.hypot(p, q)
    inv = 1.0 / r
    return r, p * inv, q * inv


@jit
def _rotate(a, b, c, s):
    """(a, b) <- (c a + s b, c b - s a) over two contiguous slices (a loop LLVM vectorizes)."""
    for j in range(a.shape[0]):
        aj = a[j]
        bj = b[j]
        a[j] = c * aj + s * bj
        b[j] = c * bj - s * aj


@jit
def givens_add_row(R, x):
    """Fold row x into upper-triangular R in place (R'^T R' = R^T R + x x^T).

    R : (d, d) float64 C-contiguous, non-negative diagonal, modified in place.
    x : (d,) float64, used as scratch (overwritten).
    """
    d = R.shape[0]
    for i in range(d):
        if x[i] == 0.0:
            continue
        R[i, i], c, s = _rotation(R[i, i], x[i])
        _rotate(R[i, i + 1:], x[i + 1:], c, s)
        x[i] = 0.0


@jit
def fold_key(R, x, w, v, lo, hi):
    """Fold key x into upper-triangular R with Givens rotations, carrying an augmented unit column.

    Rotating the stacked matrix [[R, 0], [x^T, 1]] to upper-triangular form
    gives [[R', v], [0, rho]] with R'^T R' = R^T R + x x^T, R'^T v = x and
    rho = prod(cos) = 1 / sqrt(1 + x^T (R^T R)^{-1} x). So one O(d^2) sweep
    yields the new factor, the key's whitened form v and its leverage
    v . v = 1 - rho^2, with no triangular solve.

    R : (d, d) float64 C-contiguous upper triangular, nonsingular, non-negative
        diagonal, or its packed upper triangle (see :func:`row_tail`); updated in place.
    x : (d,) float64 key (scaled), not modified.
    w, v : (d,) float64; w is scratch, v receives R'^{-T} x.
    lo, hi : x is folded in only if lo <= max|x_i| < hi (and x has no NaN);
        otherwise nothing is modified and rho = -1 is returned.
    Returns (rho, v . v, x . x).
    """
    d = x.shape[0]
    xx = 0.0
    amax = 0.0
    for j in range(d):
        a = abs(x[j])
        if a != a:
            return -1.0, 0.0, 0.0
        if a > amax:
            amax = a
        xx += x[j] * x[j]
    if not (lo <= amax < hi):
        return -1.0, 0.0, 0.0
    for j in range(d):
        w[j] = x[j]
    rho = 1.0
    vv = 0.0
    for i in range(d):
        wi = w[i]
        if wi == 0.0:
            v[i] = 0.0
            continue
        Ri = row_tail(R, i, d)
        Ri[0], c, s = _rotation(Ri[0], wi)
        _rotate(Ri[1:], w[i + 1:], c, s)
        vi = s * rho
        v[i] = vi
        vv += vi * vi
        rho = c * rho
    return rho, vv, xx


@jit
def lower_scores(tau, c, r, scale):
    """tau[a] -= scale * c[a]^2 for a < r, clipped at 0; returns the smallest new score (inf if r == 0)."""
    lo = np.inf
    for a in range(r):
        t = tau[a] - scale * (c[a] * c[a])
        if t < 0.0:
            t = 0.0
        tau[a] = t
        if t < lo:
            lo = t
    return lo


@jit
def abs_max(x):
    """max |x_i| of a (d,) float64 vector; NaN if any entry is NaN, inf if any is infinite."""
    m = 0.0
    for i in range(x.shape[0]):
        a = abs(x[i])
        if a != a:
            return a
        if a > m:
            m = a
    return m


@jit
def band_split(tau, r, eps, margin):
    """Indices a < r with |tau[a] - eps| < margin (to recompute exactly) and with tau[a] <= eps - margin (to drop)."""
    n_near = 0
    n_low = 0
    for a in range(r):
        t = tau[a]
        if abs(t - eps) < margin:
            n_near += 1
        elif t < eps:
            n_low += 1
    near = np.empty(n_near, np.int64)
    low = np.empty(n_low, np.int64)
    n_near = 0
    n_low = 0
    for a in range(r):
        t = tau[a]
        if abs(t - eps) < margin:
            near[n_near] = a
            n_near += 1
        elif t < eps:
            low[n_low] = a
            n_low += 1
    return near, low
