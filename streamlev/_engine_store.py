"""Stacked state of many exact p=2 sketches, with keys and payloads in a narrow storage precision.

One concept: the arrays of :class:`streamlev.DecodeEngine` (growable buffers,
copies, byte counts; each factor packed to its upper triangle, half the memory
of a (d, d) array) and the exact conversion between the storage precision
and float64. bfloat16 has no numpy dtype, so it is held as its uint16 bits;
float16 is held as numpy float16 and handed to kernels as uint16 bits (numba
has no CPU float16).
"""

from __future__ import annotations

import functools

import numpy as np

from . import _format
from ._state_format import COMMON_SCHEMA, VALUES_SCHEMA

__all__ = ["Store", "storage_dtype", "to_float64", "from_float64", "STORAGE", "slot_fields", "levsketch_arrays"]

STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64}


def storage_dtype(dtype, caller: str) -> str:
    """The storage precision named by ``dtype`` (a string, numpy dtype or torch dtype)."""
    name = str(dtype).replace("torch.", "")
    if name not in STORAGE:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in STORAGE:
        raise ValueError(f"The 'dtype' parameter of {caller} must be one of {sorted(STORAGE)}. Got {dtype!r}.")
    return name


def to_float64(a: np.ndarray, kind: str) -> np.ndarray:
    """Exact float64 values of an array held in storage precision ``kind``."""
    if kind == "bfloat16":
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def from_float64(a: np.ndarray, kind: str) -> np.ndarray:
    """Round float values to storage precision ``kind`` (bfloat16: to nearest even, through float32)."""
    if kind != "bfloat16":
        with np.errstate(over="ignore"):  # overflow becomes Inf, which the caller reports
            return np.asarray(a).astype(STORAGE[kind])
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = (b.astype(np.uint64) + 0x7FFF + ((b >> 16) & 1)) >> 16  # overflow to Inf is caught later
    return rounded.astype(np.uint16)


def kernel_view(a: np.ndarray) -> np.ndarray:
    """float16 arrays as their uint16 bits (what the numba kernels read); others unchanged."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


@functools.lru_cache(maxsize=8)
def _triu(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major indices of the upper triangle: the packed order of the kernels' ``row_tail``."""
    return np.triu_indices(d)


class Store:
    """Plain arrays of S stacked sketches; see :mod:`streamlev._kernels.batched_decode` for the layout."""

    FIELDS = ("R", "KT", "ids", "tau", "V", "r", "n", "e", "steps", "kappa", "fro2_ref", "fro2_now", "smax2",
              "id_lo", "id_hi", "dead", "phantom")

    def __init__(self, **arrays):
        for k in self.FIELDS:
            setattr(self, k, arrays[k])
        self.kind = arrays["kind"]

    @classmethod
    def empty(cls, S: int, d: int, dv: int, kind: str, cap: int, e0: int) -> Store:
        """Empty buffers; ``e0`` is the scale exponent of a sketch that has seen nothing."""
        dt = STORAGE[kind]
        z = lambda dtype=np.int64: np.zeros(S, dtype)  # noqa: E731
        return cls(R=np.zeros((S, d * (d + 1) // 2)), KT=np.zeros((S, d, cap), dt), ids=np.zeros((S, cap), np.int64),
                   tau=np.zeros((S, cap)), V=np.zeros((S, cap, dv), dt), r=z(), n=z(), e=np.full(S, e0, np.int64), steps=z(),
                   kappa=np.full(S, np.inf), fro2_ref=z(np.float64), fro2_now=z(np.float64), smax2=z(np.float64), id_lo=z(),
                   id_hi=np.full(S, -1, np.int64), dead=np.zeros((S, d), bool), phantom=z(np.float64), kind=kind)

    @property
    def S(self) -> int:
        return self.R.shape[0]

    @property
    def cap(self) -> int:
        return self.KT.shape[2]

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, k).nbytes for k in self.FIELDS))

    def copy(self) -> Store:
        return Store(**{k: getattr(self, k).copy() for k in self.FIELDS}, kind=self.kind)

    def grow(self, need: int) -> None:
        """Make room for ``need`` retained keys per sketch (1.25x steps: memory stays close to use)."""
        cap = self.cap
        if need <= cap:
            return
        new = max(need, int(cap * 1.25) + 1)
        S, d = self.KT.shape[:2]
        KT = np.zeros((S, d, new), self.KT.dtype)
        KT[:, :, :cap] = self.KT
        V = np.zeros((S, new, self.V.shape[2]), self.V.dtype)
        V[:, :cap] = self.V
        ids = np.zeros((S, new), np.int64)
        ids[:, :cap] = self.ids
        tau = np.zeros((S, new))
        tau[:, :cap] = self.tau
        self.KT, self.V, self.ids, self.tau = KT, V, ids, tau

    @property
    def d(self) -> int:
        return self.KT.shape[1]

    def factor(self, s: int) -> np.ndarray:
        """R of sketch s as a full (d, d) upper-triangular array (a new array)."""
        d = self.d
        R = np.zeros((d, d))
        R[_triu(d)] = self.R[s]
        return R

    def set_factor(self, s: int, R: np.ndarray) -> None:
        """Store the upper triangle of the (d, d) array R as sketch s's factor."""
        self.R[s] = R[_triu(self.d)]

    def diagonal_slots(self, j: np.ndarray) -> np.ndarray:
        """Positions of the diagonal entries (j, j) in a packed factor."""
        j = np.asarray(j, np.int64)
        return j * self.d - (j * (j - 1)) // 2

    def kernel_args(self):
        """The arrays in the order the decode kernel takes them (float16 as uint16 bits)."""
        return (self.R, kernel_view(self.KT), self.ids, self.tau, kernel_view(self.V), self.r, self.n, self.e,
                self.steps, self.kappa, self.fro2_ref, self.fro2_now, self.smax2, self.id_lo, self.id_hi)

    def keys64(self, s: int) -> np.ndarray:
        """Retained keys of sketch s as float64 rows (r, d), in slot order."""
        return to_float64(self.KT[s, :, : self.r[s]].T, self.kind)

    def values64(self, s: int) -> np.ndarray:
        return to_float64(self.V[s, : self.r[s]], self.kind)


def slot_fields(st: Store, s: int, d: int, eps: float, rtol: float, has_v: bool) -> dict:
    """Sketch s as the fields of LevSketch's byte format (canonical: sorted by id), in the same order."""
    r = int(st.r[s])
    order = np.argsort(st.ids[s, :r], kind="stable")
    fields = {"d": np.int64(d), "eps": np.float64(eps), "p": np.float64(2.0), "rtol": np.float64(rtol),
              "n": np.int64(st.n[s]), "scale_exp": np.int64(st.e[s]),
              "id_range": np.array([st.id_lo[s], st.id_hi[s]], np.int64), "R": st.factor(s),
              "ids": st.ids[s, :r][order], "keys": st.keys64(s)[order]}
    if has_v:
        fields["values"] = st.values64(s)[order]
    return fields


def levsketch_arrays(sk, kind: str, value_dim, caller: str):
    """(fields, exact scores, keys and payload in storage precision) of a LevSketch; mutates nothing.

    Raises ValueError when the payload does not match ``value_dim`` or ``kind`` cannot hold
    the sketch's keys or payloads exactly (the factor describes the exact values).
    """
    f = _format.load(sk.to_bytes(), "LevSketch", COMMON_SCHEMA, optional=VALUES_SCHEMA)
    _, tau = sk.scores()  # exact after to_bytes, in the same (sorted) id order
    V = f.get("values")
    if (value_dim is not None and V is None and sk.n > 0) or (value_dim is None and V is not None) \
            or (V is not None and V.shape[1] != value_dim):
        raise ValueError(f"{caller}: the sketch's payload does not match the engine's value_dim={value_dim}.")
    Kst = from_float64(f["keys"], kind)
    Vst = None if V is None else from_float64(V, kind)
    exact = np.array_equal(to_float64(Kst, kind), f["keys"]) and (V is None or np.array_equal(to_float64(Vst, kind), V))
    if not exact:
        raise ValueError(f"{caller}: the sketch holds keys or values that {kind} cannot store exactly; "
                         "use dtype='float64'.")
    return f, tau, Kst, Vst
