"""Streaming key matrices from disk in bounded memory."""

from __future__ import annotations

import mmap
import os

import numpy as np

__all__ = ["iter_npy_chunks"]


def iter_npy_chunks(path, chunk_rows: int = 65536):
    """Yield consecutive row blocks of a 2-D ``.npy`` file through a read-only memory map.

    Parameters
    ----------
    path : str or os.PathLike
        A 2-D ``.npy`` file (C order), e.g. keys of shape (n, d).
    chunk_rows : int, default=65536
        Rows per yielded block.

    Yields
    ------
    start : int
        Row offset of the block (use it for global ids: ``np.arange(start, start + len(block))``).
    block : ndarray of shape (m, d)
        A read-only view into the map; valid until the next block is requested.

    Notes
    -----
    Pages of a consumed block are released with ``madvise(MADV_DONTNEED)``
    where the platform has it, so the resident set stays at about one block
    however large the file is (a plain ``np.load(mmap_mode="r")`` keeps every
    page it has touched resident until memory pressure evicts it).
    """
    if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"iter_npy_chunks: chunk_rows must be a positive int, got {chunk_rows!r}.")
    arr = np.load(os.fspath(path), mmap_mode="r")
    if arr.ndim != 2:
        raise ValueError(f"iter_npy_chunks: expected a 2-D array of keys (n, d) in {path}, got shape {arr.shape}.")
    if not arr.flags.c_contiguous:
        raise ValueError(f"iter_npy_chunks: {path} is stored in Fortran order; save it in C order (np.save of "
                         "np.ascontiguousarray(a)).")
    mm = getattr(arr, "_mmap", None)
    offset = getattr(arr, "offset", 0)
    row_bytes = arr.shape[1] * arr.dtype.itemsize
    page = mmap.PAGESIZE
    can_drop = mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")
    try:
        for start in range(0, arr.shape[0], chunk_rows):
            yield start, arr[start : start + chunk_rows]
            if can_drop:
                lo = (offset + start * row_bytes) // page * page
                hi = (offset + min(arr.shape[0], start + chunk_rows) * row_bytes) // page * page
                if hi > lo:
                    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    finally:
        del arr
