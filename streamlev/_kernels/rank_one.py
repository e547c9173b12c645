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
