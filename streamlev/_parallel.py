"""Split one large numpy BLAS call over row blocks run in threads (numpy's matmul releases the GIL).

Why threads and not BLAS threads: the sketch mixes large BLAS-3 calls with many
small LAPACK calls, and a multi-threaded OpenBLAS wakes its pool for each small
one (10x slower overall on a 2-vCPU machine, see :func:`streamlev._factor.blas_threads`).
Instead BLAS stays at one thread and only the large calls are split by rows: the
caller computes the first block itself and up to ``workers - 1`` pool threads the
others. Measured on 2 vCPUs with one BLAS thread, the Gram matrix alone of 4096 x 64
float64 rows ran 1.55x faster split in two, 4096 x 128 1.8x, 1024 x 64 slower (the
hand-off costs ~50 us): hence MIN_WORK, about 0.22 ms of single-threaded gemm per part. scipy's f2py BLAS
wrappers hold the GIL (a split trmm ran slower than serial), so the scoring trmm is
called through scipy's Cython BLAS API by ctypes, which releases the GIL: the same per
row up to ~1 ulp (BLAS blocking depends on the width), and 1.2-1.8x faster split in
two from 512 x 128 and 2048 x 64 rows up (MIN_WORK_TRMM).
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.linalg import cython_blas

__all__ = ["MIN_WORK", "MIN_WORK_TRMM", "parts", "map_ranges", "map_rows", "upper_t_sq_norms"]

MIN_WORK = 2048 * 64 * 64  # multiply-adds (rows * d * d) per part below which splitting was slower
MIN_WORK_TRMM = 1024 * 64 * 64 // 2  # the same for a triangular multiply (d^2 / 2 per row)
# A pool thread starts its part 15-25 us after the caller starts the first (measured on 2 vCPUs: the
# wake-up of an idle thread), and the caller then waits for it; a 12% larger first part shortened that
# wait (LevSketch blocks of 4,096 x 64: 38.6-39.5% -> 40.1-42.9% of the two-thread dgemm rate, back to back).
CALLER_HEAD = 0.12
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_LOCK = threading.Lock()


def _forget_pool() -> None:  # a forked child has the pool object but not its threads
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool(size: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _LOCK:
        if _POOL is None or _POOL_SIZE < size:
            # A larger pool replaces the old one, which callers may still hold: it is not shut
            # down; its idle threads exit once it is garbage-collected.
            _POOL, _POOL_SIZE = ThreadPoolExecutor(size, thread_name_prefix="streamlev"), size
        return _POOL


def parts(m: int, work_per_row: int, workers: int, min_work: int = MIN_WORK) -> int:
    """How many row blocks of an (m x ...) call with ``work_per_row`` multiply-adds per row to run in parallel."""
    if workers < 2 or m < 2:
        return 1
    return int(max(1, min(workers, m, (m * work_per_row) // min_work)))


def _cuts(m: int, k: int) -> list:
    """Borders of k non-empty contiguous ranges of range(m) (k <= m), the caller's (first) one CALLER_HEAD larger."""
    first = m * (1.0 + CALLER_HEAD) / (k + CALLER_HEAD)
    cuts = [0] + [int(first + (m - first) * i / (k - 1)) for i in range(k - 1)] + [m]
    for i in range(1, k):
        cuts[i] = min(max(cuts[i], cuts[i - 1] + 1), m - (k - i))
    return cuts


def map_ranges(fn, m: int, k: int) -> list:
    """``[fn(a, b) for the k contiguous ranges [a, b) of range(m)]``, in order; the first in the caller's thread.

    ``fn`` must release the GIL for the split to pay (BLAS calls and numba ``nogil``
    kernels do) and may only write to its own range of shared output arrays.
    """
    if k <= 1:
        return [fn(0, m)]
    cuts = _cuts(m, k)
    pool = _pool(k - 1)
    futures = [pool.submit(fn, cuts[i], cuts[i + 1]) for i in range(1, k)]
    first = fn(0, cuts[1])
    return [first] + [f.result() for f in futures]


def map_rows(fn, X, k: int) -> list:
    """``[fn(X[a:b]) for the k contiguous row blocks of X]``, in row order (see :func:`map_ranges`)."""
    return map_ranges(lambda a, b: fn(X[a:b]), X.shape[0], k)


# The C signature scipy's capsule declares for dtrmm (its double type is a typedef ending in "_d");
# anything else means the ctypes prototype below would be wrong, so the caller falls back.
_DTRMM_SIGNATURE = re.compile(r"void \(char \*, char \*, char \*, char \*, int \*, int \*, (\w+_d) \*, "
                              r"\1 \*, int \*, \1 \*, int \*\)")


def _fortran_dtrmm():
    """scipy's Fortran dtrmm as a ctypes function (a foreign call: the GIL is released), or None."""
    try:
        cap = cython_blas.__pyx_capi__["dtrmm"]
        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        name = api.PyCapsule_GetName(cap)
        ptr = api.PyCapsule_GetPointer(cap, name)
    except (AttributeError, KeyError, ValueError):  # pragma: no cover - scipy without its Cython BLAS API
        return None
    if not _DTRMM_SIGNATURE.fullmatch(name.decode("ascii", "replace")):  # pragma: no cover - another layout
        return None  # the prototype below would not match: keep the serial scipy call
    c_int_p, c_char_p, c_void_p = ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_void_p
    proto = ctypes.CFUNCTYPE(None, c_char_p, c_char_p, c_char_p, c_char_p, c_int_p, c_int_p,
                             ctypes.POINTER(ctypes.c_double), c_void_p, c_int_p, c_void_p, c_int_p)
    return proto(ptr)


_DTRMM = _fortran_dtrmm()
HAVE_GIL_FREE_TRMM = _DTRMM is not None


def upper_t_sq_norms(U_f: np.ndarray, X: np.ndarray) -> np.ndarray:
    """min(1, ||U^T x||^2) for each row x of X, U upper triangular (d x d, Fortran-ordered float64).

    One BLAS dtrmm on a copy of X, the same call scipy's ``blas.dtrmm(1, U, X.T, trans_a=1)``
    makes, but without holding the GIL (requires ``HAVE_GIL_FREE_TRMM``).
    """
    Y = np.array(X, dtype=np.float64, order="C", copy=True)  # its memory is X^T in column-major order
    m, d = Y.shape
    if m:
        dim, cols, one = ctypes.c_int(d), ctypes.c_int(m), ctypes.c_double(1.0)
        _DTRMM(b"L", b"U", b"T", b"N", ctypes.byref(dim), ctypes.byref(cols), ctypes.byref(one),
               U_f.ctypes.data, ctypes.byref(dim), Y.ctypes.data, ctypes.byref(dim))
    Yt = Y.T  # reduce exactly as the serial path does (einsum over the d x m F-ordered result)
    return np.minimum(np.einsum("ij,ij->j", Yt, Yt), 1.0)
