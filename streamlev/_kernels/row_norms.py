"""Squared Euclidean norms of the rows of a block."""

from __future__ import annotations

from . import jit


@jit
def row_sq_norms(X, sq):
    """sq[i] = ||X[i]||^2 (NaN or inf where a row holds NaN or inf).

    X : (m, d) float64, C-contiguous (not modified).
    sq : (m,) float64, overwritten.

    Four independent partial sums per row: without fastmath LLVM may not reorder a
    single running sum, but it can keep four in flight (1.5x faster than
    ``einsum("ij,ij->i")`` at d = 64, whose rounding it matches to a few ulps).
    """
    m, d = X.shape
    for i in range(m):
        s0 = s1 = s2 = s3 = 0.0
        j = 0
        while j + 4 <= d:
            s0 += X[i, j] * X[i, j]
            s1 += X[i, j + 1] * X[i, j + 1]
            s2 += X[i, j + 2] * X[i, j + 2]
            s3 += X[i, j + 3] * X[i, j + 3]
            j += 4
        while j < d:
            s0 += X[i, j] * X[i, j]
            j += 1
        sq[i] = (s0 + s1) + (s2 + s3)
