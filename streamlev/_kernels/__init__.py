"""Numba kernels: pure functions on contiguous float64 arrays.

One decorator policy for every kernel: ``jit`` below (cache=True, nogil=True,
no fastmath, so results are reproducible and IEEE-exact). Kernels never
validate; the public modules do that once at the boundary and never import numba.
"""

from __future__ import annotations

import numba

jit = numba.njit(cache=True, nogil=True)
