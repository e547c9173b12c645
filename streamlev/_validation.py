"""Boundary validation shared by every public entry point.

Messages say what was received, what was expected, and how to fix it. Kernels
never validate; public functions call these helpers exactly once.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["check_eps", "check_dim", "check_keys", "check_ids", "check_values", "check_p"]


def check_eps(eps, *, name: str = "eps", caller: str) -> float:
    """Return ``eps`` as a float in (0, 1], or raise."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"The {name!r} parameter of {caller} must be a real number in (0, 1]. "
                        f"Got {eps!r} of type {type(eps).__name__} instead.")
    eps = float(eps)
    if not (0.0 < eps <= 1.0):
        raise ValueError(f"The {name!r} parameter of {caller} must be in (0, 1]. Got {eps!r} instead.")
    if eps < EPS_MIN:
        raise ValueError(f"The {name!r} parameter of {caller} must be >= {EPS_MIN:.3g}: float64 scores cannot "
                         f"resolve smaller shares (and d/eps would overflow). Got {eps!r} instead.")
    return eps


EPS_MIN = 2.0**-52  # leverage is computed to ~1e-12 at best; below machine epsilon eps is meaningless


def check_p(p, *, caller: str) -> float:
    """Return ``p`` as a positive finite float, or raise."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        raise TypeError(f"The 'p' parameter of {caller} must be a positive real number. "
                        f"Got {p!r} of type {type(p).__name__} instead.")
    p = float(p)
    if not (0.0 < p < np.inf):
        raise ValueError(f"The 'p' parameter of {caller} must be in (0, inf). Got {p!r} instead.")
    return p


def check_dim(d, *, name: str = "d", caller: str) -> int:
    """Return ``d`` as a positive int, or raise."""
    if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
        raise TypeError(f"The {name!r} parameter of {caller} must be an int >= 1. "
                        f"Got {d!r} of type {type(d).__name__} instead.")
    d = int(d)
    if d < 1:
        raise ValueError(f"The {name!r} parameter of {caller} must be an int >= 1. Got {d} instead.")
    return d


def _check_real_array(x, *, name: str, caller: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor: no hard dependency on torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise TypeError(f"{caller}: {name} must hold real numbers (a float or integer dtype). "
                        f"Got dtype {arr.dtype} instead; convert with np.asarray({name}, dtype=np.float64).")
    return arr


def check_keys(keys, d: int, *, caller: str, name: str = "keys", check_finite: bool = True) -> np.ndarray:
    """Return ``keys`` as a 2-D real array with ``d`` columns, no copy when possible.

    float16/float32/float64 keep their dtype (no full float64 copy of the
    caller's array); integer dtypes are converted to float64.
    """
    arr = _check_real_array(keys, name=name, caller=caller)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"{caller}: {name} must be 2-D of shape (m, {d}) or 1-D of shape ({d},). "
                         f"Got an array of shape {arr.shape}; for (heads, m, d) blocks use streamlev.MultiHeadSketch.")
    if arr.shape[1] != d:
        raise ValueError(f"{caller}: {name} has {arr.shape[1]} columns but this sketch was built with d={d}. "
                         f"Pass keys of shape (m, {d}).")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    elif arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float64)  # e.g. longdouble: float64 is what the sketch computes in
    if check_finite and arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{caller}: {name} contains NaN or Inf in {bad} of {arr.shape[0]} rows. "
                         f"Remove or fix those rows; the sketch was left unchanged.")
    return arr


def check_ids(ids, m: int, *, caller: str) -> np.ndarray:
    """Return ``ids`` as a 1-D int64 array of ``m`` distinct values, or raise."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind == "f":
        if arr.size and not (np.isfinite(arr).all() and np.all(arr == np.round(arr))):
            raise TypeError(f"{caller}: ids must be integers. Got non-integer floats (dtype {arr.dtype}).")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu" or arr.dtype.kind == "b":
        raise TypeError(f"{caller}: ids must be integers. Got dtype {arr.dtype}.")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{caller}: ids must fit in int64. Got a maximum of {arr.max()}.")
    arr = arr.astype(np.int64, copy=False)
    if arr.ndim != 1 or arr.shape[0] != m:
        raise ValueError(f"{caller}: ids must be 1-D with one id per key ({m}). Got shape {arr.shape}.")
    if m > 1:
        srt = np.sort(arr)
        dup = srt[1:][srt[1:] == srt[:-1]]
        if dup.size:
            raise ValueError(f"{caller}: ids must be distinct within a block. Got repeated id(s) "
                             f"{np.unique(dup)[:5].tolist()}.")
    return arr


def check_values(values, m: int, dv: int | None, *, caller: str) -> np.ndarray:
    """Return the payload ``values`` as a float64 (m, dv) array, or raise."""
    arr = _check_real_array(values, name="values", caller=caller)
    if arr.ndim == 1 and m == 1:
        arr = arr.reshape(1, -1)
    elif arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[0] != m:
        raise ValueError(f"{caller}: values must have one row per key, shape ({m}, dv). Got shape {arr.shape}.")
    if dv is not None and arr.shape[1] != dv:
        raise ValueError(f"{caller}: values have {arr.shape[1]} columns but earlier values had {dv}.")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{caller}: values contain NaN or Inf; the sketch was left unchanged.")
    return arr
