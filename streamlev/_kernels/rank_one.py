"""Rank-one (one key at a time) updates of the triangular factor and of leverage scores."""

from __future__ import annotations

import math

import numpy as np

from . import jit


@jit
def givens_add_row(R, x):
    """Fold row x into upper-triangular R in place (R'^T R' = R^T R + x x^T).

    R : (d, d) float64 C-contiguous, non-negative diagonal, modified in place.
    x : (d,) float64, used as scratch (overwritten).
    """
    d = R.shape[0]
    for i in range(d):
        xi = x[i]
        if xi == 0.0:
            continue
        rii = R[i, i]
        r = math.hypot(rii, xi)
        c = rii / r
        s = xi / r
        R[i, i] = r
        for j in range(i + 1, d):
            a = R[i, j]
            b = x[j]
            R[i, j] = c * a + s * b
            x[j] = c * b - s * a
        x[i] = 0.0


@jit
def decode_step(R, x, u, y, xs):
    """One key through a nonsingular factor: prefix quantities for Sherman-Morrison, then Givens fold-in.

    With M = R^T R before the key, returns h = x^T M^{-1} x and writes
    u = M^{-1} x. The key's own leverage (w.r.t. the prefix including it) is
    h / (1 + h); every earlier key's leverage drops by (k_j . u)^2 / (1 + h),
    which the caller applies with one BLAS matrix-vector product.

    R  : (d, d) float64 C-contiguous upper triangular, nonsingular; updated in place.
    x  : (d,) float64 key (scaled), not modified.
    u  : (d,) float64 output.
    y, xs : (d,) float64 scratch.
    """
    d = R.shape[0]
    # y = R^{-T} x (forward substitution, row-oriented so R is read contiguously)
    for i in range(d):
        y[i] = x[i]
    for i in range(d):
        y[i] = y[i] / R[i, i]
        yi = y[i]
        for j in range(i + 1, d):
            y[j] -= R[i, j] * yi
    # u = R^{-1} y (back substitution)
    for i in range(d - 1, -1, -1):
        s = y[i]
        for j in range(i + 1, d):
            s -= R[i, j] * u[j]
        u[i] = s / R[i, i]
    h = 0.0
    for i in range(d):
        h += y[i] * y[i]
    for i in range(d):
        xs[i] = x[i]
    givens_add_row(R, xs)
    return h


@jit
def _dot4(a, b, d):
    # four independent partial sums: the same IEEE operations on every run, without the
    # add-latency chain of a single accumulator (fastmath is off by policy)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    j = 0
    while j + 4 <= d:
        s0 += a[j] * b[j]
        s1 += a[j + 1] * b[j + 1]
        s2 += a[j + 2] * b[j + 2]
        s3 += a[j + 3] * b[j + 3]
        j += 4
    while j < d:
        s0 += a[j] * b[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@jit
def decode_key(R, x, K, tau, r, y, u, xs):
    """One key through a nonsingular factor, scores included: the whole rank-one step in one call.

    Computes h and u = M^{-1} x as :func:`decode_step` does, lowers every
    retained score by (k_a . u)^2 / (1 + h), and folds x into R.

    R   : (d, d) float64 C-contiguous upper triangular, nonsingular; updated in place.
    x   : (d,) float64 key (scaled), not modified.
    K   : (cap, d) float64 C-contiguous retained keys; rows [0, r) are used.
    tau : (cap,) float64 retained scores; entries [0, r) updated in place (clipped at 0).
    y, u, xs : (d,) float64 scratch.
    Returns (h, min over the updated scores or inf when r == 0, x . x).
    """
    d = R.shape[0]
    xx = _dot4(x, x, d)
    h = decode_step(R, x, u, y, xs)
    inv = 1.0 / (1.0 + h)
    lo = np.inf
    for a in range(r):
        c = _dot4(K[a], u, d)
        t = tau[a] - c * c * inv
        if t < 0.0:
            t = 0.0
        tau[a] = t
        if t < lo:
            lo = t
    return h, lo, xx


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
