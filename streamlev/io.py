"""Reading key matrices from disk in bounded memory: ``.npy``, ``.npz`` and ``.safetensors``.

:func:`open_keys` opens one array of a file lazily (``.npy`` and
``.safetensors`` through a read-only memory map, so only the rows asked for
are read) and checks the file's header before any data is touched, so a text
file named ``.npy`` or a truncated download gets a message that says what the
file is rather than a NumPy internal error. bfloat16 tensors (the usual dtype
of LLM key dumps), which NumPy has no dtype for, are read as float32 exactly
(:func:`bf16_to_float32`). :func:`iter_npy_chunks` streams a 2-D ``.npy``
file block by block and returns each block's pages to the OS.
"""

from __future__ import annotations

import json
import mmap
import os
import zipfile
from dataclasses import dataclass

import numpy as np

__all__ = ["KeyArray", "open_keys", "read_npy_header", "read_safetensors_header", "bf16_to_float32",
           "iter_npy_chunks"]

_NPY_MAGIC = b"\x93NUMPY"
# safetensors dtype names -> numpy dtypes (little-endian); BF16 is read as raw uint16 bits
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_ST_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def bf16_to_float32(bits) -> np.ndarray:
    """Convert raw bfloat16 bit patterns (uint16) to float32, exactly.

    Parameters
    ----------
    bits : array_like of uint16, any shape
        bfloat16 values as stored on disk (little-endian words).

    Returns
    -------
    ndarray of float32, same shape
        bfloat16 is the top half of a float32, so the conversion shifts each
        word 16 bits left: every value (NaN, Inf and subnormals included) maps
        to the float32 with the same value, as ``torch.Tensor.float()`` does.
    """
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_npy_header(path):
    """Shape, dtype, memory order and data offset of a ``.npy`` file, from its header only.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    shape : tuple of int
    dtype : numpy.dtype
    fortran_order : bool
    offset : int
        Byte offset of the data.

    Raises
    ------
    ValueError
        The file is not a ``.npy`` file (e.g. text saved under that name), its
        header is damaged, it holds Python objects, or it is shorter than its
        header claims (a truncated copy).
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        head = fh.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            raise ValueError(f"{path} is not a .npy file: it starts with {head!r}, not the NumPy magic "
                             f"{_NPY_MAGIC!r}. Write keys with numpy.save(path, array) (a text or CSV file "
                             "needs numpy.loadtxt first).")
        fh.seek(0)
        try:
            version = np.lib.format.read_magic(fh)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(fh)
        except (ValueError, OSError, SyntaxError) as exc:
            raise ValueError(f"{path}: damaged .npy header ({exc}).") from None
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{path} holds Python objects (dtype {dtype}), not numbers; streamlev reads numeric "
                         "arrays only (save keys as float16/32/64).")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < need:
        raise ValueError(f"{path} is truncated: its header says shape {shape} of {dtype} ({need} bytes) but the "
                         f"file has {size} bytes.")
    return tuple(int(x) for x in shape), dtype, bool(fortran), offset


def read_safetensors_header(path):
    """The tensors of a ``.safetensors`` file, from its JSON header only.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict
        ``{name: (dtype_name, shape, absolute_byte_offset)}``, e.g.
        ``{"k": ("BF16", (2, 12, 4096, 128), 1024)}``; ``__metadata__`` is left out.

    Raises
    ------
    ValueError
        When the header is not valid safetensors, or a tensor's byte range does
        not match its shape and dtype or lies outside the file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(_ST_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a .safetensors file (no valid header length).")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a .safetensors file (header is not JSON: {exc}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a .safetensors file (header is not a JSON object).")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (lo, hi) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: damaged .safetensors header entry for {name!r}.") from None
        item = np.dtype(_ST_DTYPES[dt]).itemsize if dt in _ST_DTYPES else None
        if item is not None and (hi - lo != int(np.prod(shape, dtype=np.int64)) * item or lo < 0
                                 or 8 + n + hi > size):
            raise ValueError(f"{path}: tensor {name!r} ({dt} {shape}) has byte range [{lo}, {hi}) that does not "
                             "match its shape or lies outside the file (truncated?).")
        out[name] = (dt, shape, 8 + n + int(lo))
    return out


@dataclass
class KeyArray:
    """One array of a key file, read lazily row block by row block.

    Attributes
    ----------
    path : str
    name : str
        Array name inside an ``.npz`` / tensor name of a ``.safetensors``
        file; ``""`` for ``.npy``.
    shape : tuple of int
        ``(..., n, d)``: the last two axes are keys and their dimension, any
        leading axes are groups (e.g. ``(layers, heads, n, d)``).
    dtype : str
        The stored dtype (``"bfloat16"`` for BF16 tensors).
    """

    path: str
    name: str
    shape: tuple
    dtype: str
    _data: object = None

    def rows(self, start: int, stop: int, group: tuple = ()) -> np.ndarray:
        """Read keys ``start:stop`` of ``array[group]`` from disk.

        Parameters
        ----------
        start, stop : int
            Row range along the key axis (``n``).
        group : tuple of int, default=()
            Index into the leading group axes, e.g. ``(layer, head)``; empty for a 2-D array.

        Returns
        -------
        ndarray of shape (stop - start, d)
            In the stored dtype; bfloat16 comes back as float32 (exactly).
        """
        block = np.asarray(self._data[tuple(group) + (slice(start, stop),)])
        return bf16_to_float32(block) if self.dtype == "bfloat16" else block


def _choose(path, key, names, what):
    if key is not None:
        if key not in names:
            raise ValueError(f"{path} has no {what} named {key!r}; it holds {names}")
        return key
    if len(names) == 1:
        return names[0]
    if not names:
        raise ValueError(f"{path} holds no {what}s")
    raise ValueError(f"{path} holds {len(names)} {what}s {names}; choose one with key=NAME")


def open_keys(path, key: str | None = None) -> KeyArray:
    """Open one array of a ``.npy``, ``.npz`` or ``.safetensors`` file without reading its data.

    Parameters
    ----------
    path : str or os.PathLike
    key : str, optional
        Array name in a ``.npz`` / tensor name in a ``.safetensors`` file;
        optional when the file holds exactly one. Not allowed for ``.npy``.

    Returns
    -------
    KeyArray
        ``.npy`` and ``.safetensors`` data are memory-mapped (only the rows
        read are paged in); a ``.npz`` member is decompressed whole.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError
        From opening the file.
    ValueError
        ``key`` is missing from the file (or needed and not given), the
        extension is unknown, or the file is damaged or foreign (the message
        says which).
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        if key is not None:
            raise ValueError("key applies to .npz and .safetensors files only; a .npy file holds one array")
        shape, dtype, fortran, offset = read_npy_header(path)
        data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C") \
            if np.prod(shape) else np.zeros(shape, dtype)
        return KeyArray(path, "", shape, str(dtype), data)
    if ext == ".npz":
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a .npz archive (not a zip file); write one with numpy.savez.")
        try:
            z = np.load(path, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: damaged .npz archive ({exc}).") from None
        with z:
            name = _choose(path, key, list(z.files), "array")
            try:
                arr = z[name]
            except ValueError as exc:
                if "allow_pickle" in str(exc):  # numpy's message names a keyword a user of this API cannot pass
                    raise ValueError(f"{path}: array {name!r} holds Python objects, not numbers.") from None
                raise ValueError(f"{path}: cannot read array {name!r} ({exc}).") from None
            except (zipfile.BadZipFile, EOFError, OSError) as exc:
                raise ValueError(f"{path}: damaged .npz archive ({exc}).") from None
        return KeyArray(path, name, arr.shape, str(arr.dtype), arr)
    if ext == ".safetensors":
        tensors = read_safetensors_header(path)
        name = _choose(path, key, sorted(tensors), "tensor")
        dt, shape, offset = tensors[name]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dt}, which streamlev cannot read; supported: "
                             f"{sorted(_ST_DTYPES)}")
        data = np.memmap(path, dtype=_ST_DTYPES[dt], mode="r", offset=offset, shape=shape) if np.prod(shape) \
            else np.zeros(shape, _ST_DTYPES[dt])
        return KeyArray(path, name, shape, "bfloat16" if dt == "BF16" else str(np.dtype(_ST_DTYPES[dt])), data)
    raise ValueError(f"{path}: unsupported file type {ext or '(no extension)'!r}; expected .npy, .npz or "
                     ".safetensors")


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

    Raises
    ------
    ValueError
        Not a ``.npy`` file (:func:`read_npy_header` says what it is instead),
        not 2-D, Fortran order, or a bad ``chunk_rows``.

    Notes
    -----
    Pages of a consumed block are released with ``madvise(MADV_DONTNEED)``
    where the platform has it, so the resident set stays at about one block
    however large the file is (a plain ``np.load(mmap_mode="r")`` keeps every
    page it has touched resident until memory pressure evicts it).
    """
    if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"iter_npy_chunks: chunk_rows must be a positive int, got {chunk_rows!r}.")
    shape, _, fortran, _ = read_npy_header(path)
    if len(shape) != 2:
        raise ValueError(f"iter_npy_chunks: expected a 2-D array of keys (n, d) in {path}, got shape {shape}.")
    if fortran and shape[0] > 1 and shape[1] > 1:
        raise ValueError(f"iter_npy_chunks: {path} is stored in Fortran order; save it in C order (np.save of "
                         "np.ascontiguousarray(a)).")
    arr = np.load(os.fspath(path), mmap_mode="r")
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
