"""Boundary validation shared by every public entry point (the one validation module of streamlev).

Messages say what was received, what was expected, and how to fix it. Kernels
never validate; public functions call these helpers exactly once, before any
state changes. Also the numpy / torch interchange at the boundary (torch stays
optional and lazily imported): inputs may be numpy arrays (float16/32/64,
integers) or CPU torch tensors (bfloat16 is converted to float32); results are
numpy, handed back as torch tensors when the caller passed torch.
"""

from __future__ import annotations

import numbers
import os

import numpy as np

from ._constants import EPS_MIN, MAX_STATE_BYTES

__all__ = ["check_eps", "check_dim", "check_keys", "check_ids", "check_values", "check_p", "check_rtol",
           "check_bool", "check_matrix", "check_matrix_2d", "check_positive_float", "check_max_iter", "check_idx", "check_choice",
           "is_torch", "as_real_array", "like_input", "check_state_size", "check_payload", "check_budget", "check_seed", "check_scale",
           "check_attention_p"]


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
    return _real_rows(arr, name=name, caller=caller, check_finite=check_finite,
                      note="; the sketch was left unchanged")


def check_matrix_2d(K, *, caller: str, name: str = "K", check_finite: bool = True) -> np.ndarray:
    """Return ``K`` as a 2-D real array (float16/32/64 keep their dtype, no copy when possible), or raise.

    For the offline functions: a 1-D array is an error (is it one key or n scalars?).
    """
    arr = _check_real_array(K, name=name, caller=caller)
    if arr.ndim != 2:
        raise ValueError(f"{caller}: {name} must be 2-D of shape (n, d), one key per row. Got an array of shape "
                         f"{arr.shape}; reshape one key with {name}.reshape(1, -1) or n scalar keys with "
                         f"{name}.reshape(-1, 1).")
    return _real_rows(arr, name=name, caller=caller, check_finite=check_finite, note="")


def _real_rows(arr, *, name, caller, check_finite, note):
    if arr.dtype.kind in "iu" or arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float64)  # ints, longdouble: float64 is what streamlev computes in
    if check_finite and arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{caller}: {name} contains NaN or Inf in {bad} of {arr.shape[0]} rows. "
                         f"Remove or fix those rows{note}.")
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


def check_rtol(rtol, *, caller: str, allow_zero: bool = True) -> float:
    """Return the relative ridge ``rtol`` as a float in [0, 1) (or (0, 1) without ``allow_zero``), or raise."""
    lo_ok = (lambda x: x >= 0.0) if allow_zero else (lambda x: x > 0.0)
    if isinstance(rtol, (bool, np.bool_)) or not isinstance(rtol, numbers.Real) or not (
            lo_ok(float(rtol)) and float(rtol) < 1.0):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"The 'rtol' parameter of {caller} must be a float in {interval}. Got {rtol!r}.")
    return float(rtol)


def check_bool(x, *, name: str, caller: str) -> bool:
    """Return ``x`` as a bool if it is one (numpy bools included), or raise TypeError."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{caller}: {name} must be True or False, got {x!r}.")
    return bool(x)

# ------------------------------------------------------------ offline l_p routines

def check_matrix(K, *, caller: str, name: str = "K") -> np.ndarray:
    """Return ``K`` as a finite 2-D float64 array (a copy only when needed), or raise.

    Raises
    ------
    TypeError
        Non-real dtype (complex, bool, object, strings).
    ValueError
        ``K.ndim != 2`` or NaN/Inf entries.
    """
    arr = _check_real_array(K, name=name, caller=caller)
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

# ------------------------------------------------------------ numpy / torch interchange

def is_torch(x) -> bool:
    """True for a torch tensor, detected without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "cpu")


def as_real_array(x, *, name: str, caller: str, ndim: tuple = (2,), check_finite: bool = True) -> np.ndarray:
    """Return ``x`` as a real numpy array (float16/32/64 keep their dtype; ints become float64).

    Raises TypeError for non-real dtypes and ValueError for a wrong number of
    dimensions or (when ``check_finite``) NaN/Inf entries.
    """
    arr = _check_real_array(x, name=name, caller=caller)
    if arr.ndim not in ndim:
        want = " or ".join(f"{k}-D" for k in ndim)
        raise ValueError(f"{caller}: {name} must be {want}; got an array of shape {arr.shape}.")
    if arr.dtype.kind in "iu" or arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float64)
    if check_finite and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{caller}: {name} contains NaN or Inf ({int((~np.isfinite(arr)).sum())} entries); "
                         "remove or fix them.")
    return arr


def like_input(result: np.ndarray, template):
    """Return ``result`` as a CPU torch tensor of ``template``'s float dtype if ``template`` is torch (as torch ops do)."""
    if not is_torch(template):
        return result
    import torch  # lazily: torch is an optional extra

    out = torch.from_numpy(np.ascontiguousarray(result))
    if template.is_floating_point():
        out = out.to(template.dtype)  # computed in float64, rounded once to the caller's dtype
    return out


# ------------------------------------------------------------ memory
def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return None


def check_state_size(d: int, *, caller: str, matrices: int = 1) -> None:
    """Raise ValueError (not a bare MemoryError later) when ``matrices`` d x d float64 arrays cannot fit.

    The limit is the machine's physical memory (and never above ``MAX_STATE_BYTES``).
    """
    need = matrices * d * d * 8
    limit = min(physical_memory() or MAX_STATE_BYTES, MAX_STATE_BYTES)
    if need > limit:
        raise ValueError(f"{caller}: d={d} needs {need:,} bytes for its d x d float64 state, more than the "
                         f"{limit:,} bytes of memory available. Reduce d (e.g. project the keys) or split "
                         "the dimension across sketches.")


def check_payload(values, m: int, dv: int | None, has_data: bool, *, caller: str):
    """The payload rule of every sketch: values for every key or for none; returns (m, dv) float64 or None."""
    if values is None:
        if dv is not None and m:
            raise ValueError(f"{caller}: this sketch carries values; pass values= with shape ({m}, {dv}).")
        return None
    if dv is None and has_data:
        raise ValueError(f"{caller}: values were not given for earlier keys; a sketch either carries values for "
                         "every key or for none.")
    return check_values(values, m, dv, caller=caller)


# ------------------------------------------------------------ selection and attention options
def check_budget(budget, *, caller: str, minimum: int = 1, allow_none: bool = False):
    """Return ``budget`` as an int >= ``minimum`` (or None when allowed), or raise TypeError/ValueError."""
    if budget is None and allow_none:
        return None
    want = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"{caller}: budget must be {want}. Got {budget!r} of type {type(budget).__name__}.")
    if int(budget) < minimum:
        raise ValueError(f"{caller}: budget must be {want}. Got {budget}.")
    return int(budget)


def check_head(head, heads: int, *, caller: str) -> int:
    """Return ``head`` as an int in [0, heads), or raise TypeError (not an int) / ValueError (out of range)."""
    if isinstance(head, (bool, np.bool_)) or not isinstance(head, numbers.Integral):
        raise TypeError(f"{caller}: head must be an int in [0, {heads}). Got {head!r}.")
    if not 0 <= int(head) < heads:
        raise ValueError(f"{caller}: head must be in [0, {heads}). Got {head}.")
    return int(head)


def check_seed(seed, *, caller: str) -> int:
    """Return ``seed`` as an int >= 0, or raise TypeError."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise TypeError(f"{caller}: seed must be an int >= 0. Got {seed!r}.")
    return int(seed)


def check_scale(scale, *, caller: str, default: str = "1/sqrt(d)"):
    """Return the softmax logit ``scale`` as a finite float, or None; raise TypeError otherwise."""
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real) or not np.isfinite(scale):
        raise TypeError(f"{caller}: scale must be a finite real number or None (default {default}). Got {scale!r}.")
    return float(scale)


def check_attention_p(p, scale, *, caller: str, p_min: float = 0.0):
    """Return ``(p, scale)`` for an attention kind: ``"softmax"`` (with a scale) or a real p (then scale is None).

    ``p_min`` = 0 accepts any p > 0; ``p_min`` >= 1 accepts p >= p_min (differentiable |x|^p for training).
    """
    want = "a positive number" if p_min <= 0 else f"a finite number >= {p_min:g}"
    if isinstance(p, str):
        if p != "softmax":
            raise ValueError(f"{caller}: p must be 'softmax' or {want} (|x|^p attention). Got {p!r}.")
        return "softmax", check_scale(scale, caller=caller)
    ok = (0.0 < float(p) if p_min <= 0 else p_min <= float(p)) if isinstance(p, numbers.Real) else False
    if isinstance(p, (bool, np.bool_)) or not ok or not float(p) < np.inf:
        raise ValueError(f"{caller}: p must be 'softmax' or {want} (|x|^p attention). Got {p!r}.")
    if scale is not None:
        raise ValueError(f"{caller}: scale applies to softmax only (|x|^p attention is invariant to it). Got "
                         f"scale={scale!r} with p={p!r}; pass scale=None.")
    return float(p), None
