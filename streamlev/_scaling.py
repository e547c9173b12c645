"""Power-of-two scaling: the one helper every module uses to keep squares inside float64.

Multiplying by 2**-e is exact (only the exponent changes), so scaled and
unscaled data describe the same leverage, attention shares and Lewis weights.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pow2_exponent", "scale_by_max"]


def pow2_exponent(x):
    """Exponents e with ``x * 2**-e`` in [0.5, 1) for positive x (0 where x == 0); scalar or array."""
    if np.ndim(x) == 0:
        return int(np.frexp(x)[1]) if x > 0 else 0
    return np.where(x > 0, np.frexp(x)[1], 0)


def scale_by_max(K) -> tuple[np.ndarray, int]:
    """``(K * 2**-e as a new float64 array, e)`` with ``max|K| * 2**-e`` in [0.5, 1) (e = 0 for zero K)."""
    K = np.asarray(K)
    m = float(np.max(np.abs(K))) if K.size else 0.0
    X = K.astype(np.float64)  # always a copy
    e = pow2_exponent(m)
    return (np.ldexp(X, -e, out=X) if e else X), e
