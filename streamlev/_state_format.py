"""The byte layout shared by the factor-keeping sketches (LevSketch, LpSketch): fields and their checks.

Field order is part of the format (equal sketches give equal bytes): the common
fields below, then the sketch's own, then the optional payload ``values``.
"""

from __future__ import annotations

import numpy as np

from ._ids import IdRange
from ._scaled_factor import check_scaled_state

__all__ = ["COMMON_SCHEMA", "VALUES_SCHEMA", "common_fields", "load_common"]

COMMON_SCHEMA = {
    "d": ((), "i8"), "eps": ((), "f8"), "p": ((), "f8"), "rtol": ((), "f8"), "n": ((), "i8"),
    "scale_exp": ((), "i8"), "id_range": ((2,), "i8"), "R": (("d", "d"), "f8"), "ids": (("r",), "i8"),
    "keys": (("r", "d"), "f8"),
}
VALUES_SCHEMA = {"values": (("r", None), "f8")}


def common_fields(d: int, eps: float, p: float, rtol: float, n: int, e: int, idr: IdRange, R, ids, keys,
                  extra: dict | None = None, values=None) -> dict:
    """All fields in format order: the common ones (ids sorted, keys scaled), ``extra``, then ``values``."""
    out = {"d": np.int64(d), "eps": np.float64(eps), "p": np.float64(p), "rtol": np.float64(rtol),
           "n": np.int64(n), "scale_exp": np.int64(e), "id_range": idr.as_array(), "R": R, "ids": ids, "keys": keys}
    out.update(extra or {})
    if values is not None:
        out["values"] = values
    return out


def load_common(f: dict, max_retained: int, caller: str, *, positive_diagonal: bool = True):
    """Checked ``(n, e, R, ids, keys, IdRange, values or None)`` from loaded fields; ValueError if inconsistent."""
    n, e, R, ids, K = int(f["n"]), int(f["scale_exp"]), f["R"], f["ids"], f["keys"]
    r = ids.shape[0]
    if n < 0 or r > n or r > max_retained:
        raise ValueError(f"{caller}: inconsistent sizes (n={n}, retained={r}, scale={e}).")
    check_scaled_state(R, K, n, e, R.shape[0], caller, positive_diagonal=positive_diagonal)
    if r > 1 and np.any(np.diff(ids) <= 0):
        raise ValueError(f"{caller}: retained ids are not sorted and distinct.")
    idr = IdRange.from_array(f["id_range"], n, ids, caller)
    V = f.get("values")
    if V is not None and not np.isfinite(V).all():
        raise ValueError(f"{caller}: values contain NaN or Inf.")
    return n, e, np.ascontiguousarray(R), ids, K, idr, V
