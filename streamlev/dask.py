"""Sketch key matrices held in a ``dask.array``: one sketch per row-chunk, merged by a tree.

Merging is exact (the merged sketch is the sketch of the union of the keys),
so a tree reduction over row-chunks gives the same universal set and scores as
one process reading every key. This module only builds the task graph; it
needs the optional extra ``streamlev[dask]`` (``dask[array]`` and
``distributed``), imported lazily so that ``import streamlev`` never needs it.

Why a ``dask.delayed`` tree rather than ``dask.array.reduction``: every chunk
needs its *global* row offset (the ids of its keys), which is known when the
graph is built from ``x.chunks`` but is not passed to a reduction's chunk
function, and the partial results are opaque sketches rather than arrays, so
``reduction``'s concatenation and ``keepdims`` machinery would only get in the
way. The explicit tree has ``ceil(log_s(chunks))`` levels of merge tasks, each
merging at most ``split_every`` partial sketches.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os

import numpy as np

import streamlev

from ._validation import check_eps, check_p
from .io import read_npy_header

__all__ = ["sketch_array", "sketch_heads", "sketch_class", "from_npy"]

DEFAULT_SPLIT_EVERY = 8  # the fan-in dask itself uses for tree reductions
_TRANSPORTS = ("bytes", "pickle")


def _dask_array():
    # importlib makes it explicit that this is the third-party ``dask``, not this module.
    try:
        return importlib.import_module("dask.array"), importlib.import_module("dask")
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("streamlev.dask needs dask: pip install 'streamlev[dask]' "
                          "(or pip install 'dask[array]' distributed).") from None


def sketch_class(p: float = 2.0):
    """The sketch class for attention exponent ``p``: LevSketch for p = 2, else ``streamlev.LpSketch``.

    Parameters
    ----------
    p : float, default=2.0
        Attention exponent of |x|^p attention, > 0.

    Returns
    -------
    type
        :class:`streamlev.LevSketch` or :class:`streamlev.LpSketch`.

    Raises
    ------
    ValueError
        When ``p != 2`` and this version of streamlev has no ``LpSketch``.
    """
    p = check_p(p, caller="streamlev.dask.sketch_class")
    if p == 2.0:
        return streamlev.LevSketch
    cls = getattr(streamlev, "LpSketch", None)
    if cls is None:
        raise ValueError(f"streamlev.dask: p={p!r} needs streamlev.LpSketch, which this version of streamlev "
                         "does not provide. Use p=2 (LevSketch) or upgrade streamlev.")
    return cls


# ----------------------------------------------------------------- tasks
# Module-level functions so that every task pickles by reference on a cluster.

def _encode(sk, transport):
    return sk.to_bytes() if transport == "bytes" else sk


def _decode(part, cls, transport):
    return cls.from_bytes(part) if transport == "bytes" else part


def _chunk_sketch(block, offset, cls, d, eps, p, kwargs, transport):
    """Sketch of one row-chunk; its keys get the global ids offset, offset+1, ..."""
    block = np.asarray(block)
    sk = cls(d, eps, p=p, **kwargs)
    m = block.shape[0]
    if m:
        sk.update(block, ids=np.arange(offset, offset + m, dtype=np.int64))
    return _encode(sk, transport)


def _merge_parts(parts, cls, d, eps, p, kwargs, transport):
    """Merge partial sketches into a *fresh* accumulator.

    Inputs are never mutated: Dask may keep a task's input in memory (persisted
    chunks, a replica on another worker, the threaded scheduler's cache) and
    feed the same object to a retried task, and mutating it would count its
    keys twice.
    """
    acc = cls(d, eps, p=p, **kwargs)
    for part in parts:
        acc.merge(_decode(part, cls, transport))
    return _encode(acc, transport)


def _finish(part, cls, transport):
    sk = _decode(part, cls, transport)
    # A pickled object may be the very one the scheduler keeps for a persisted input: hand out a copy.
    return cls.from_bytes(sk.to_bytes()) if transport == "pickle" else sk


# ------------------------------------------------------------- validation
def _check_split_every(split_every, caller):
    if split_every is None:
        return DEFAULT_SPLIT_EVERY
    if isinstance(split_every, (bool, np.bool_)) or not isinstance(split_every, numbers.Integral) \
            or int(split_every) < 2:
        raise ValueError(f"{caller}: split_every must be an int >= 2 (the fan-in of each merge task) or None "
                         f"for {DEFAULT_SPLIT_EVERY}. Got {split_every!r}.")
    return int(split_every)


def _check_ids_offset(ids_offset, caller):
    if isinstance(ids_offset, (bool, np.bool_)) or not isinstance(ids_offset, numbers.Integral) \
            or int(ids_offset) < 0:
        raise ValueError(f"{caller}: ids_offset must be an int >= 0 (the id of the first row). Got {ids_offset!r}.")
    return int(ids_offset)


def _check_transport(transport, caller):
    if transport not in _TRANSPORTS:
        raise ValueError(f"{caller}: transport must be one of {_TRANSPORTS}. Got {transport!r}.")
    return transport


def _check_dask_array(x, min_ndim, caller, shape_doc):
    da, _ = _dask_array()
    if not isinstance(x, da.Array):
        raise TypeError(f"{caller}: x must be a dask.array.Array of shape {shape_doc}. Got {type(x).__name__}; "
                        "wrap numpy arrays or memory maps with dask.array.from_array(x, chunks=(rows, -1)).")
    if x.ndim < min_ndim or (min_ndim == 2 and x.ndim != 2):
        raise ValueError(f"{caller}: x must have shape {shape_doc}. Got shape {x.shape}.")
    if np.dtype(x.dtype).kind not in "fiu":
        raise TypeError(f"{caller}: x must hold real numbers (a float or integer dtype). Got dtype {x.dtype}.")
    if any(math.isnan(c) for c in x.chunks[-2]):
        raise ValueError(f"{caller}: the row chunk sizes of x are unknown (nan), so the global row offsets (ids) "
                         "cannot be assigned. Call x.compute_chunk_sizes() first.")
    if x.shape[-1] < 1:
        raise ValueError(f"{caller}: keys must have d >= 1 columns. Got shape {x.shape}.")
    if len(x.chunks[-1]) > 1:
        x = x.rechunk({x.ndim - 1: -1})  # a sketch sees whole rows
    return x


def _tree(x2, cls, eps, p, kwargs, split_every, ids_offset, transport):
    """Delayed sketch of a 2-D dask array of keys (rows chunked, one column chunk)."""
    _, dask = _dask_array()
    delayed = dask.delayed
    d = int(x2.shape[1])
    blocks = x2.to_delayed().ravel()
    offsets = ids_offset + np.concatenate([[0], np.cumsum(x2.chunks[0][:-1], dtype=np.int64)])
    parts = [delayed(_chunk_sketch, pure=True)(b, int(o), cls, d, eps, p, kwargs, transport)
             for b, o in zip(blocks, offsets)]
    while len(parts) > 1:
        parts = [delayed(_merge_parts, pure=True)(parts[i : i + split_every], cls, d, eps, p, kwargs, transport)
                 for i in range(0, len(parts), split_every)]
    if not parts:  # an array with no row chunks at all
        parts = [delayed(_chunk_sketch, pure=True)(np.zeros((0, d)), 0, cls, d, eps, p, kwargs, transport)]
    return delayed(_finish, pure=True)(parts[0], cls, transport)


def _prepare(x, eps, p, split_every, ids_offset, transport, kwargs, *, caller, min_ndim, shape_doc):
    eps = check_eps(eps, caller=caller)
    p = check_p(p, caller=caller)
    split_every = _check_split_every(split_every, caller)
    ids_offset = _check_ids_offset(ids_offset, caller)
    transport = _check_transport(transport, caller)
    x = _check_dask_array(x, min_ndim, caller, shape_doc)
    cls = sketch_class(p)
    # Build one empty sketch here so that bad sketch parameters fail now, not inside a task on a worker.
    cls(int(x.shape[-1]), eps, p=p, **kwargs)
    return x, eps, p, split_every, ids_offset, transport, cls


# ------------------------------------------------------------------ input
class _NpyRows:
    """Array-like view of a .npy file that pickles as its path: each task memory-maps the file itself.

    ``da.from_array(np.load(path, mmap_mode="r"))`` puts the memory map in the
    graph, and pickling a memory map copies all of its data; this object
    keeps only the path, so the bytes are read where the task runs.
    """

    def __init__(self, path, shape, dtype):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        return np.asarray(np.load(self.path, mmap_mode="r")[index])


def from_npy(path, chunks=65_536):
    """A dask array of the keys in a ``.npy`` file, read by the tasks (memory-mapped) rather than the client.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy`` file holding a 2-D array (n, d) or a grouped one
        (groups..., n, d), visible at the same path to every worker (local
        disk of a single machine, or a shared file system).
    chunks : int or tuple, default=65536
        Rows per chunk (int), or full dask chunks. An int chunks the second-to-last
        axis (rows) and keeps the last axis whole; group axes are chunked by 1.

    Returns
    -------
    dask.array.Array with the file's shape and dtype.

    Notes
    -----
    The task graph holds only the path, shape and dtype, so building and
    submitting it costs the same for a kilobyte or a terabyte of keys.
    """
    da, dask = _dask_array()
    path = os.fspath(path)
    try:
        shape, dtype, _, _ = read_npy_header(path)  # the header only: a foreign file fails here, clearly
    except ValueError as exc:
        raise ValueError(f"streamlev.dask.from_npy: {exc}") from None
    if len(shape) < 2:
        raise ValueError(f"streamlev.dask.from_npy: {path!r} holds an array of shape {shape}; expected keys "
                         "of shape (n, d) or (groups..., n, d).")
    if isinstance(chunks, numbers.Integral) and not isinstance(chunks, (bool, np.bool_)):
        if int(chunks) < 1:
            raise ValueError(f"streamlev.dask.from_npy: chunks must be >= 1 rows. Got {chunks!r}.")
        chunks = (1,) * (len(shape) - 2) + (int(chunks), -1)
    st = os.stat(path)
    name = "from-npy-" + dask.base.tokenize(path, st.st_mtime_ns, st.st_size, shape, str(dtype), chunks)
    rows = _NpyRows(path, shape, dtype)
    return da.from_array(rows, chunks=chunks, name=name, asarray=True, fancy=False,
                         meta=np.empty((0,) * len(rows.shape), dtype=rows.dtype))


# ------------------------------------------------------------------ public
def sketch_array(x, eps: float, p: float = 2.0, split_every: int | None = None, ids_offset: int = 0, *,
                 transport: str = "bytes", compute: bool = True, **sketch_kwargs):
    """Sketch of the keys in a dask array, built per row-chunk and merged by a tree reduction.

    Parameters
    ----------
    x : dask.array.Array of shape (n, d)
        Keys, chunked along rows (any real dtype). Column chunks are merged
        into one (``x.rechunk({1: -1})``) because a sketch needs whole rows.
    eps : float in (0, 1]
        Threshold of the sketch (attention share).
    p : float, default=2.0
        Attention exponent: ``LevSketch`` for p = 2, ``streamlev.LpSketch``
        for other p (when this version of streamlev provides it).
    split_every : int >= 2, optional
        Fan-in of each merge task (default 8): the tree has
        ``ceil(log_split_every(number of row chunks))`` merge levels.
    ids_offset : int >= 0, default=0
        Id of row 0; row ``i`` gets id ``ids_offset + i``. Use it to sketch
        several arrays separately and merge the results (disjoint ids).
    transport : {"bytes", "pickle"}, default="bytes"
        How partial sketches travel between tasks: as ``to_bytes()`` output
        (versioned, CRC-checked, the form Ray and Spark recipes use) or as
        sketch objects that Dask pickles.
    compute : bool, default=True
        Return the sketch; with False return a ``dask.delayed`` object whose
        result is the sketch (to compute with other work in one call).
    **sketch_kwargs
        Passed to the sketch constructor (e.g. ``rtol``).

    Returns
    -------
    LevSketch (p = 2) or LpSketch, or a Delayed of one when ``compute=False``.

    Notes
    -----
    Guarantee: merging is exact, so the result has the same universal set and
    scores (to the sketch's documented float64 accuracy) as one sketch fed
    every row of ``x`` in one process, for any chunking and any
    ``split_every``. Tasks never mutate their inputs, so retried tasks (a lost
    worker) recompute the same answer. The computation runs on the active
    scheduler: a ``distributed.Client`` if one is current, else Dask's
    default (threads).

    Examples
    --------
    >>> import numpy as np, dask.array as da, streamlev as sl
    >>> from streamlev.dask import sketch_array
    >>> K = np.random.default_rng(0).standard_normal((5000, 8))
    >>> sk = sketch_array(da.from_array(K, chunks=(700, 8)), 0.01, split_every=3)
    >>> bool(np.array_equal(sk.universal_set(), sl.universal_set(K, 0.01)))
    True
    """
    caller = "streamlev.dask.sketch_array"
    x, eps, p, split_every, ids_offset, transport, cls = _prepare(
        x, eps, p, split_every, ids_offset, transport, sketch_kwargs,
        caller=caller, min_ndim=2, shape_doc="(n, d)")
    out = _tree(x, cls, eps, p, sketch_kwargs, split_every, ids_offset, transport)
    return out.compute() if compute else out


def sketch_heads(x, eps: float, p: float = 2.0, split_every: int | None = None, ids_offset: int = 0, *,
                 transport: str = "bytes", compute: bool = True, **sketch_kwargs):
    """One sketch per group of keys, e.g. per head (heads, n, d) or per (layer, head) (layers, heads, n, d).

    Parameters
    ----------
    x : dask.array.Array of shape (g1, ..., gk, n, d), k >= 1
        Keys grouped by the leading axes; the last two axes are (rows, dim).
        Chunking the group axes by 1 keeps each task on one group's keys.
    eps, p, split_every, ids_offset, transport, **sketch_kwargs
        As in :func:`sketch_array`; within every group row ``i`` gets id
        ``ids_offset + i``.
    compute : bool, default=True
        Compute all groups' trees in one ``dask.compute`` call (the scheduler
        runs different groups in parallel); with False return the same nested
        structure of Delayed objects.

    Returns
    -------
    Nested lists of sketches, ``out[i1]...[ik]`` for group ``(i1, ..., ik)``:
    ``out[head]`` for a 3-D ``x``, ``out[layer][head]`` for a 4-D ``x``.

    Notes
    -----
    Guarantee: ``out[i1]...[ik]`` equals :func:`sketch_array` of
    ``x[i1, ..., ik]`` (same universal set and scores).

    Examples
    --------
    >>> import numpy as np, dask.array as da, streamlev as sl
    >>> from streamlev.dask import sketch_heads
    >>> K = np.random.default_rng(0).standard_normal((2, 3, 400, 4))  # (layers, heads, n, d)
    >>> out = sketch_heads(da.from_array(K, chunks=(1, 1, 150, 4)), 0.05)
    >>> bool(np.array_equal(out[1][2].universal_set(), sl.universal_set(K[1, 2], 0.05)))
    True
    """
    caller = "streamlev.dask.sketch_heads"
    x, eps, p, split_every, ids_offset, transport, cls = _prepare(
        x, eps, p, split_every, ids_offset, transport, sketch_kwargs,
        caller=caller, min_ndim=3, shape_doc="(groups..., n, d) with at least one group axis")
    groups = x.shape[:-2]

    def build(prefix):
        if len(prefix) == len(groups):
            return _tree(x[prefix], cls, eps, p, sketch_kwargs, split_every, ids_offset, transport)
        return [build(prefix + (i,)) for i in range(groups[len(prefix)])]

    out = build(())
    if not compute:
        return out
    _, dask = _dask_array()
    (result,) = dask.compute(out)
    return result
