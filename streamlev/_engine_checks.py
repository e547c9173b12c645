"""Boundary checks of DecodeEngine.update: shapes, dtypes, finiteness after rounding, fresh ids.

Everything that can be wrong with the input is found here, before any sketch changes.
"""

from __future__ import annotations

import numpy as np

from ._engine_store import from_float64, kernel_view, to_float64
from ._validation import as_real_array, check_eps

__all__ = ["check_update", "check_ids", "per_sketch_eps"]

def check_update(st, d, kind, dv, keys, values, ids):
    """Checked (X64, Xst, ids, XV64, XVst) for DecodeEngine.update; raises before anything changes.

    X64/XV64 are the float64 values of the keys/payloads rounded to ``kind``; Xst/XVst the same
    in storage form as the kernels read it; ids (S, t) int64 are fresh for every sketch.
    """
    caller = "DecodeEngine.update"
    S = st.S
    K = as_real_array(keys, name="keys", caller=caller, ndim=(2, 3), check_finite=False)
    one = K.ndim == 2
    if one:
        K = K[:, None, :]
    if K.shape[0] != S or K.shape[2] != d:
        raise ValueError(f"{caller}: keys must have shape (sketches, t, d) = ({S}, t, {d}) or (sketches, d); "
                         f"got {tuple(np.shape(keys))}.")
    t = K.shape[1]
    Xst = np.ascontiguousarray(from_float64(K, kind))
    X64 = to_float64(Xst, kind)
    if not np.isfinite(X64).all():
        raise ValueError(f"{caller}: keys contain NaN or Inf (after rounding to {kind}: "
                         f"{int((~np.isfinite(X64)).sum())} entries). Fix or rescale them; nothing was changed.")
    nid = check_ids(st, ids, S, t, caller)
    XV64 = XVst = None
    if dv is not None:
        if values is None:
            raise ValueError(f"{caller}: this engine stores payloads; pass values of shape ({S}, {t}, {dv}).")
        V = as_real_array(values, name="values", caller=caller, ndim=(2, 3), check_finite=False)
        if V.ndim == 2 and one:
            V = V[:, None, :]
        if V.shape != (S, t, dv):
            raise ValueError(f"{caller}: values must have shape ({S}, {t}, {dv}); got {tuple(np.shape(values))}.")
        XVst = np.ascontiguousarray(from_float64(V, kind))
        XV64 = to_float64(XVst, kind)
        if not np.isfinite(XV64).all():
            raise ValueError(f"{caller}: values contain NaN or Inf (after rounding to {kind}).")
    elif values is not None:
        raise ValueError(f"{caller}: this engine was built without value_dim; values cannot be stored.")
    if XVst is None:
        XVst = np.zeros((S, t, 0), st.V.dtype)
    return X64, kernel_view(Xst), nid, XV64, kernel_view(XVst)


def check_ids(st, ids, S, t, caller):
    """(S, t) int64 ids: default positions, or given ones checked distinct and unused."""
    if ids is None:
        return st.n[:, None] + np.arange(t, dtype=np.int64)[None, :]
    arr = np.asarray(ids.detach().cpu().numpy() if hasattr(ids, "detach") else ids)
    if arr.dtype.kind not in "iu" or arr.dtype == np.uint64 and arr.size and arr.max() >= 2**63:
        raise TypeError(f"{caller}: ids must be int64-range integers; got dtype {arr.dtype}.")
    if arr.shape == (t,):
        arr = np.broadcast_to(arr, (S, t))
    if arr.shape != (S, t):
        raise ValueError(f"{caller}: ids must have shape ({t},) or ({S}, {t}); got {arr.shape}.")
    nid = np.ascontiguousarray(arr, dtype=np.int64)
    srt = np.sort(nid, axis=1)
    if t > 1 and (srt[:, 1:] == srt[:, :-1]).any():
        s = int(np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0])
        raise ValueError(f"{caller}: ids must be distinct within a block; sketch {s} got repeated ids.")
    inside = (st.n[:, None] > 0) & (nid >= st.id_lo[:, None]) & (nid <= st.id_hi[:, None])
    for s in np.flatnonzero(inside.any(axis=1)).tolist():  # only sketches whose id range is hit
        interval = st.id_hi[s] - st.id_lo[s] + 1 == st.n[s]  # then every id in the range was used
        clash = nid[s][inside[s]] if interval else nid[s][np.isin(nid[s], st.ids[s, : st.r[s]])]
        if clash.size:
            raise ValueError(f"{caller}: sketch {s}: id(s) {clash[:5].tolist()} were already used; "
                             "ids must be fresh (default: n, n+1, ...).")
    return nid


def per_sketch_eps(eps, S, caller):
    """eps as a checked float64 array of shape (S,) (a scalar is broadcast)."""
    arr = np.asarray(eps.detach().cpu().numpy() if hasattr(eps, "detach") else eps)
    if arr.ndim == 0:
        arr = np.full(S, arr)
    if arr.shape != (S,):
        raise ValueError(f"{caller}: eps must be a scalar or have shape ({S},) (one per sketch); got {arr.shape}.")
    return np.array([check_eps(v.item(), caller=caller) for v in arr])
