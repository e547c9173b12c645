"""Split one large numpy BLAS call over row blocks run in threads (numpy's matmul releases the GIL).

Why threads and not BLAS threads: the sketch mixes large BLAS-3 calls with many
small LAPACK calls, and a multi-threaded OpenBLAS wakes its pool for each small
one (10x slower overall on a 2-vCPU machine, see :func:`streamlev._factor.blas_threads`).
Instead BLAS stays at one thread and only the large calls are split by rows: the
caller computes the first block itself and up to ``workers - 1`` pool threads the
others. Measured on 2 vCPUs with one BLAS thread, the Gram matrix alone of 4096 x 64
float64 rows ran 1.55x faster split in two, 4096 x 128 1.8x, 1024 x 64 slower (the
hand-off costs ~50 us). Inside a whole sketch update, though, 4096 x 64 chunks split
in two ran 0.93-1.11x as fast (the pool thread wakes up late), 4096 x 128 1.14-1.22x:
hence MIN_WORK, about 0.45 ms of single-threaded gemm per part. Only numpy calls
gain: scipy's f2py BLAS wrappers (trmm, trsm) hold the GIL, and split over threads
they ran slower than serial.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["MIN_WORK", "parts", "map_rows"]

MIN_WORK = 4096 * 64 * 64  # multiply-adds (rows * d * d) per part below which splitting did not pay
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
            old, _POOL, _POOL_SIZE = _POOL, ThreadPoolExecutor(size, thread_name_prefix="streamlev"), size
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


def parts(m: int, work_per_row: int, workers: int) -> int:
    """How many row blocks of an (m x ...) call with ``work_per_row`` multiply-adds per row to run in parallel."""
    if workers < 2 or m < 2:
        return 1
    return int(max(1, min(workers, m, (m * work_per_row) // MIN_WORK)))


def map_rows(fn, X, k: int) -> list:
    """``[fn(X[a:b]) for the k contiguous row blocks of X]``, in row order; block 0 in the caller's thread.

    ``fn`` must release the GIL for the split to pay (BLAS calls do) and must not
    touch shared state. With ``k == 1`` this is just ``[fn(X)]``.
    """
    if k <= 1:
        return [fn(X)]
    m = X.shape[0]
    cuts = [m * i // k for i in range(k + 1)]
    pool = _pool(k - 1)
    futures = [pool.submit(fn, X[cuts[i]:cuts[i + 1]]) for i in range(1, k)]
    first = fn(X[: cuts[1]])
    return [first] + [f.result() for f in futures]
