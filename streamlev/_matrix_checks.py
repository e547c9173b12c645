"""Boundary validation for the offline l_p routines (``lewis``, ``sensitivity``).

Kept separate from ``_validation`` (which serves the streaming sketch) so the
two can evolve independently; ``check_p`` is reused from there. Messages say
what was received, what was expected, and how to fix it.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["check_matrix", "check_positive_float", "check_max_iter", "check_idx", "check_choice"]


def check_matrix(K, *, caller: str, name: str = "K") -> np.ndarray:
    """Return ``K`` as a finite 2-D float64 array (a copy only when needed), or raise.

    Raises
    ------
    TypeError
        Non-real dtype (complex, bool, object, strings).
    ValueError
        ``K.ndim != 2`` or NaN/Inf entries.
    """
    if hasattr(K, "detach") and hasattr(K, "cpu"):  # torch tensor, without importing torch
        K = K.detach().cpu()
        if str(getattr(K, "dtype", "")) == "torch.bfloat16":
            K = K.float()
        K = K.numpy()
    arr = np.asarray(K)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{caller}: {name} must hold real numbers (a float or integer dtype). "
                        f"Got dtype {arr.dtype} instead; convert with np.asarray({name}, dtype=np.float64).")
    if arr.ndim != 2:
        raise ValueError(f"{caller}: {name} must be a 2-D array of shape (n, d), one key per row. "
                         f"Got an array with ndim={arr.ndim} and shape {arr.shape}; "
                         f"for a single key use {name}.reshape(1, -1).")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{caller}: {name} contains NaN or Inf in {bad} of {arr.shape[0]} rows. "
                         f"Expected finite values; remove or fix those rows.")
    return arr


def check_positive_float(x, *, name: str, caller: str, upper: float = np.inf) -> float:
    """Return ``x`` as a float in (0, upper), or raise."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"The {name!r} parameter of {caller} must be a positive real number. "
                        f"Got {x!r} of type {type(x).__name__} instead.")
    x = float(x)
    if not (0.0 < x < upper):
        raise ValueError(f"The {name!r} parameter of {caller} must be in (0, {upper}). Got {x!r} instead.")
    return x


def check_max_iter(max_iter, *, caller: str) -> int | None:
    """Return ``max_iter`` as an int >= 1 or None, or raise."""
    if max_iter is None:
        return None
    if isinstance(max_iter, (bool, np.bool_)) or not isinstance(max_iter, numbers.Integral):
        raise TypeError(f"The 'max_iter' parameter of {caller} must be None or an int >= 1. "
                        f"Got {max_iter!r} of type {type(max_iter).__name__} instead.")
    if int(max_iter) < 1:
        raise ValueError(f"The 'max_iter' parameter of {caller} must be None or an int >= 1. "
                         f"Got {int(max_iter)} instead.")
    return int(max_iter)


def check_idx(idx, n: int, *, caller: str) -> np.ndarray:
    """Return row indices as a 1-D int64 array with values in [0, n), or raise.

    ``None`` means all rows. Negative indices count from the end, as in numpy.
    """
    if idx is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(idx)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.size == 0 and arr.ndim == 1:
        arr = arr.astype(np.int64)  # [] is float64 in numpy
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise TypeError(f"{caller}: idx must be None or a 1-D sequence of integer row indices. "
                        f"Got dtype {arr.dtype} and shape {arr.shape} instead.")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        bad = arr[(arr < -n) | (arr >= n)]
        raise IndexError(f"{caller}: idx must lie in [-{n}, {n}) for K with n={n} rows. "
                         f"Got out-of-range value(s) {bad[:5].tolist()}.")
    return np.where(arr < 0, arr + n, arr)


def check_choice(value, choices, *, name: str, caller: str) -> str:
    """Return ``value`` if it is one of ``choices``, or raise ValueError."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"The {name!r} parameter of {caller} must be one of {sorted(choices)}. "
                         f"Got {value!r} instead.")
    return value
