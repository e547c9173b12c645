"""The byte format of every streamlev sketch: versioned, self-describing, CRC32-checked, no pickle.

Layout (little-endian)::

    b"SLEV" | u16 version | u8 len + kind (ascii) | u16 field count
    per field: u8 len + name (ascii) | u8 dtype code | u8 ndim | u64 * ndim shape | raw data
    u32 CRC32 of everything before it

Sizes are checked against the bytes actually present before anything is
allocated, so a header claiming 2^60 rows is rejected without allocation.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["dump", "load", "MAGIC", "VERSION"]

MAGIC = b"SLEV"
VERSION = 1
_DTYPES = {1: np.dtype("<f8"), 2: np.dtype("<i8")}
_CODES = {"f8": 1, "i8": 2}


def dump(kind: str, fields: dict) -> bytes:
    """Serialize named float64/int64 arrays (or scalars) under a sketch kind."""
    out = [MAGIC, struct.pack("<H", VERSION), _name(kind), struct.pack("<H", len(fields))]
    for name, value in fields.items():
        arr = np.asarray(value)
        code = 1 if arr.dtype.kind == "f" else 2
        arr = np.asarray(arr, dtype=_DTYPES[code]).copy(order="C")  # keeps 0-d scalars 0-d
        out += [_name(name), struct.pack("<BB", code, arr.ndim), struct.pack(f"<{arr.ndim}Q", *arr.shape),
                arr.tobytes()]
    body = b"".join(out)
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _name(s: str) -> bytes:
    b = s.encode("ascii")
    return struct.pack("<B", len(b)) + b


class _Reader:
    def __init__(self, buf: memoryview, caller: str):
        self.buf, self.pos, self.caller = buf, 0, caller

    def take(self, k: int) -> memoryview:
        if k < 0 or self.pos + k > len(self.buf):
            raise ValueError(f"{self.caller}: truncated or corrupt data: needed {k} more bytes at offset "
                             f"{self.pos}, only {len(self.buf) - self.pos} remain.")
        v = self.buf[self.pos : self.pos + k]
        self.pos += k
        return v

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def name(self) -> str:
        (k,) = self.unpack("<B")
        try:
            return bytes(self.take(k)).decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{self.caller}: corrupt data: a field name is not ASCII.") from None


def load(data, kind: str, schema: dict, optional: dict | None = None) -> dict:
    """Parse bytes written by :func:`dump`, checking kind, checksum, dtypes and shapes.

    ``schema`` maps field name -> (shape spec, dtype string); a shape spec holds
    ints, names of scalar int fields (e.g. "d") or shared symbols ("r"), or None
    (any). Raises TypeError for non-bytes input and ValueError for anything else wrong.
    """
    caller = f"{kind}.from_bytes"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{caller}: expected bytes, got {type(data).__name__}.")
    buf = memoryview(data).cast("B")
    if len(buf) < 4 + 2 + 1 + 2 + 4 or bytes(buf[:4]) != MAGIC:
        raise ValueError(f"{caller}: not streamlev sketch bytes (expected the magic {MAGIC!r} and a header; "
                         f"got {len(buf)} bytes starting with {bytes(buf[:4])!r}).")
    (crc,) = struct.unpack("<I", buf[-4:])
    if zlib.crc32(buf[:-4]) & 0xFFFFFFFF != crc:
        raise ValueError(f"{caller}: checksum mismatch: the bytes are corrupted or truncated.")
    rd = _Reader(buf[:-4], caller)
    rd.take(4)
    (version,) = rd.unpack("<H")
    if version != VERSION:
        raise ValueError(f"{caller}: unsupported format version {version}; this streamlev reads version {VERSION}.")
    got_kind = rd.name()
    if got_kind != kind:
        raise ValueError(f"{caller}: these bytes hold a {got_kind!r}, not a {kind!r}.")
    (nf,) = rd.unpack("<H")
    spec = dict(schema)
    spec.update(optional or {})
    out = {}
    for _ in range(nf):
        name = rd.name()
        code, ndim = rd.unpack("<BB")
        if name not in spec or name in out:
            raise ValueError(f"{caller}: unexpected or repeated field {name!r}.")
        if code not in _DTYPES or ndim > 2:
            raise ValueError(f"{caller}: field {name!r} has an invalid dtype code {code} or ndim {ndim}.")
        shape = rd.unpack(f"<{ndim}Q")
        size = 1
        for s in shape:
            size *= s
        nbytes = size * _DTYPES[code].itemsize
        raw = rd.take(nbytes)  # raises before any allocation if the claim exceeds the data
        want_shape, want_dtype = spec[name]
        if _DTYPES[code] != np.dtype("<" + want_dtype) or len(shape) != len(want_shape):
            raise ValueError(f"{caller}: field {name!r} has dtype code {code} and shape {shape}; "
                             f"expected {want_dtype} with {len(want_shape)} dimensions.")
        arr = np.frombuffer(raw, dtype=_DTYPES[code]).reshape(shape).copy()
        out[name] = arr[()] if ndim == 0 else arr
    if rd.pos != len(rd.buf):
        raise ValueError(f"{caller}: {len(rd.buf) - rd.pos} trailing bytes after the last field.")
    missing = [k for k in schema if k not in out]
    if missing:
        raise ValueError(f"{caller}: missing field(s) {missing}.")
    symbols: dict = {}
    for name, arr in out.items():
        for dim, want in zip(np.shape(arr), spec[name][0]):
            if want is None:
                continue
            expect = int(out[want]) if isinstance(want, str) and want in out else symbols.setdefault(want, dim)
            if dim != expect:
                raise ValueError(f"{caller}: field {name!r} has shape {np.shape(arr)}, inconsistent with {want}={expect}.")
    return out
