"""DecodeEngine: the exact p=2 sketches of every KV head of a model, updated per token in one call.

Why a stacked state instead of a list of :class:`~streamlev.LevSketch`: at decode
time a sketch's work per token is small (O(d^2 + r d)), so with tens of heads per
layer the per-sketch Python of a list costs more than the arithmetic. Here all
sketches live in stacked numpy arrays and one compiled loop
(:mod:`streamlev._kernels.batched_decode`) folds the new keys of every sketch.
Whatever that loop does not take (the first d keys, ill-conditioned factors,
out-of-range keys, large blocks) goes through LevSketch itself, one sketch at a
time, so the two give the same sets by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _factor, _format
from ._constants import (DECODE_MAX_ROWS, DEFAULT_RTOL, KAPPA_DECODE, MARGIN_REFRESH, NO_DATA_EXP, REFRESH_STEPS,
                         SAFE_HI, SAFE_LO, SVD_MAX_D)
from ._engine_checks import check_update, per_sketch_eps
from ._engine_queries import EngineQueries
from ._engine_store import STORAGE, Store, levsketch_arrays, slot_fields, storage_dtype
from ._kernels.batched_decode import DONE, GROW, REFRESH, decode_block
from ._sketch_base import Sketch
from ._validation import check_dim, check_rtol
from .multihead import per_head_max_retained
from .sketch import LevSketch

__all__ = ["DecodeEngine", "BatchChanges"]

_LIMITS = np.array([KAPPA_DECODE, MARGIN_REFRESH, REFRESH_STEPS, SAFE_LO, SAFE_HI])


class BatchChanges(NamedTuple):
    """Ids that entered and left the retained sets during one :meth:`DecodeEngine.update`.

    ``added_id[i]`` (a new key's id) is retained by sketch ``added_sketch[i]``
    after the call; ``evicted_id[i]`` was retained by sketch ``evicted_sketch[i]``
    before the call and is not after it. All int64, sorted by (sketch, id).
    """

    added_sketch: np.ndarray
    added_id: np.ndarray
    evicted_sketch: np.ndarray
    evicted_id: np.ndarray


class DecodeEngine(EngineQueries, Sketch):
    """Exact universal sets (x^2 attention, leverage >= eps) of many key streams, fed token by token.

    Parameters
    ----------
    heads : int
        Number of key streams S (every KV head of every layer, flattened: layers x KV heads).
    d : int
        Key dimension.
    eps : float or array_like of shape (S,)
        Threshold of each sketch, in (0, 1].
    dtype : {"float16", "bfloat16", "float32", "float64"}, default "float32"
        Precision in which retained keys and payloads are stored. Keys are
        rounded to it once on arrival; every leverage is then computed in
        float64 on the rounded values, so the guarantee below holds for the
        keys *as stored*.
    value_dim : int, optional
        Width of a payload row stored with each key (e.g. the value vector);
        then every ``update`` passes ``values``.
    rtol : float, default 1e-13
        Relative ridge of the leverage definition (see :mod:`streamlev.reference`).

    Notes
    -----
    Guarantee, per sketch s (the same as :class:`~streamlev.LevSketch`): after
    any sequence of ``update`` and ``merge`` calls over keys K_s (rounded to
    ``dtype``), the retained ids are exactly ``{j : tau_j(K_s) >= eps_s}``, and
    ``universal_set(e, head=s)`` equals the offline set for every
    ``e >= eps_s``; ``num_retained[s] <= floor(d / eps_s)``.

    Memory: per sketch the upper triangle of the d x d float64 factor, packed
    (``4 d (d + 1)`` bytes), plus, per retained key, its key and payload in
    ``dtype`` and an int64 id and float64 score (buffers grow by 1.25x as
    needed); independent of the number of keys seen.

    Errors: on bad input (NaN/Inf, wrong shape or dtype, a wrong number of
    sketches, repeated or reused ids) ``update`` raises before any sketch
    changes. Every public method holds an internal lock.
    """

    def __init__(self, heads: int, d: int, eps, *, dtype="float32", value_dim: int | None = None,
                 rtol: float = DEFAULT_RTOL):
        super().__init__()
        caller = "DecodeEngine"
        S = check_dim(heads, name="heads", caller=caller)
        self._d = check_dim(d, caller=caller)
        self._eps = per_sketch_eps(eps, S, caller)
        self._rtol = check_rtol(rtol, caller=caller)
        self._dv = 0 if value_dim is None else check_dim(value_dim, name="value_dim", caller=caller)
        self._has_v = value_dim is not None
        self._kind = storage_dtype(dtype, caller)
        self._st = Store.empty(S, self._d, self._dv, self._kind, cap=16, e0=NO_DATA_EXP)

    # ------------------------------------------------------------ properties
    @property
    def heads(self) -> int:
        """Number of key streams S."""
        return self._st.S

    @property
    def d(self) -> int:
        """Key dimension."""
        return self._d

    @property
    def eps(self) -> np.ndarray:
        """Per-sketch thresholds, shape (S,) (a copy)."""
        return self._eps.copy()

    @property
    def rtol(self) -> float:
        """Relative ridge of the leverage definition."""
        return self._rtol

    @property
    def dtype(self) -> str:
        """Storage precision of keys and payloads."""
        return self._kind

    @property
    def value_dim(self) -> int | None:
        """Payload width, or None when the engine carries no payload."""
        return self._dv if self._has_v else None

    @property
    def n(self) -> np.ndarray:
        """Keys seen per sketch, shape (S,), int64 (a copy)."""
        return self._st.n.copy()

    @property
    def num_retained(self) -> np.ndarray:
        """Keys held per sketch, shape (S,), int64 (a copy)."""
        return self._st.r.copy()

    max_retained = per_head_max_retained

    def _size_params(self):
        return self._d, self._eps

    def _snapshot(self):
        return self._st.copy()

    def _restore(self, snap):
        self._st = snap

    @property
    def nbytes(self) -> int:
        """Bytes held by the engine's arrays (factors, key/payload buffers, ids, scores, counters)."""
        return self._st.nbytes

    def __repr__(self) -> str:
        return (f"DecodeEngine(heads={self.heads}, d={self._d}, dtype={self._kind!r}, "
                f"value_dim={self.value_dim}; n.max()={int(self._st.n.max())}, "
                f"num_retained.max()={int(self._st.r.max())})")

    # ---------------------------------------------------------------- update
    def update(self, keys, values=None, ids=None, *, return_changes: bool = False):
        """Fold t new keys into every sketch.

        Parameters
        ----------
        keys : array_like of shape (S, t, d), or (S, d) for one key each
            numpy float16/32/64 (or integers) or a CPU torch tensor (bfloat16 included);
            rounded once to the engine's ``dtype``.
        values : array_like of shape (S, t, value_dim) or (S, value_dim), optional
            Payload rows; required exactly when the engine was built with ``value_dim``.
        ids : array_like of int, shape (t,) (shared) or (S, t), optional
            Distinct new ids per sketch; default ``n[s], ..., n[s] + t - 1``.
        return_changes : bool, default False
            Return a :class:`BatchChanges` instead of self.

        Returns
        -------
        self, or BatchChanges when ``return_changes`` is True.

        Notes
        -----
        Blocks of up to 8 keys per sketch take the compiled rank-one loop
        (O(d^2 + r d) per key, no Python per sketch or key). A sketch the loop
        cannot take yet (fewer than d keys, condition number above 1e4, keys
        outside 2**+-250, an id inside its id range) and blocks of more than 8
        keys go through :meth:`LevSketch.update` for that sketch.
        """
        with self._lock:
            X64, Xst, nid, XV64, XVst = check_update(self._st, self._d, self._kind, self._dv if self._has_v else None,
                                                     keys, values, ids)
            S, t = nid.shape
            st = self._st
            added = np.zeros((S, t), bool)
            ev_ids = np.empty((S, int(st.r.max()) + 1), np.int64)
            ev_cnt = np.zeros(S, np.int64)
            if t:
                # Only float64 storage can hold keys whose range needs rescaling, where LevSketch may
                # refuse a key after other sketches changed: keep a copy to undo the whole call then.
                risky = self._kind == "float64" and (bool((st.e[st.n > 0] != 0).any()) or out_of_range(X64))
                snap = st.copy() if risky else None
                try:
                    if t <= DECODE_MAX_ROWS:
                        self._decode(X64, Xst, nid, XV64, XVst, added, ev_ids, ev_cnt)
                    else:
                        for s in range(S):
                            self._general(s, 0, X64, nid, XV64, added, ev_ids, ev_cnt)
                except BaseException:
                    if snap is not None:
                        self._st = snap
                    raise
            if not return_changes:
                return self
            a_s, a_j = np.nonzero(added)
            e_s = np.repeat(np.arange(S, dtype=np.int64), ev_cnt)
            e_id = ev_ids[np.arange(ev_ids.shape[1])[None, :] < ev_cnt[:, None]]
            a_id = nid[a_s, a_j]
            ao, eo = np.lexsort((a_id, a_s)), np.lexsort((e_id, e_s))
            return BatchChanges(a_s[ao].astype(np.int64), a_id[ao], e_s[eo], e_id[eo])

    def _decode(self, X64, Xst, nid, XV64, XVst, added, ev_ids, ev_cnt):
        """The compiled loop over all sketches; numpy handles the (rare) sketches it stops on, then resumes."""
        st = self._st
        S, t = nid.shape
        start = np.zeros(S, np.int64)
        status = np.zeros(S, np.int64)
        half = self._kind == "float16"
        # Sketches with coordinates no key has touched: a key that touches one goes the general way;
        # for the others a positive diagonal there (see _decode.py) lets the compiled step run.
        has_dead = st.dead.any(axis=1)
        for s in np.flatnonzero(has_dead).tolist():
            if X64[s][:, st.dead[s]].any():
                self._general(s, 0, X64, nid, XV64, added, ev_ids, ev_cnt)
                start[s] = t
        phantom = np.flatnonzero(has_dead & (start < t))
        self._phantoms(phantom, True)
        try:
            while True:
                decode_block(*st.kernel_args(), self._eps, X64, Xst, nid, XVst, half, _LIMITS, start, status,
                             added, ev_ids, ev_cnt)
                stopped = np.flatnonzero(status != DONE)
                if not stopped.size:
                    return
                for s in stopped.tolist():
                    if status[s] == GROW:
                        st.grow(int(st.r[s]) + 1)
                        continue
                    on = s in phantom
                    if on:
                        self._phantoms([s], False)
                    if status[s] == REFRESH:
                        self._refresh(s, nid[s], added[s], ev_ids, ev_cnt)
                        if on and st.dead[s].any():  # still untouched (the block's keys were checked)
                            self._phantoms([s], True)
                        else:
                            phantom = phantom[phantom != s]
                    else:
                        phantom = phantom[phantom != s]
                        self._general(s, int(start[s]), X64, nid, XV64, added, ev_ids, ev_cnt)
                        start[s] = t
                if (start >= t).all():
                    return
        finally:
            self._phantoms(phantom, False)

    def _phantoms(self, sketches, on: bool):
        """Put (or take back) the stand-in diagonal on the untouched coordinates of these sketches' R."""
        st = self._st
        for s in np.asarray(sketches, np.int64).tolist():
            st.R[s, st.diagonal_slots(np.flatnonzero(st.dead[s]))] = st.phantom[s] if on else 0.0

    def _general(self, s, j0, X64, nid, XV64, added, ev_ids, ev_cnt):
        """Keys j0.. of sketch s through LevSketch itself (first keys, rescaling, ill-conditioning, blocks)."""
        sk = self._to_lev(s)
        ch = sk.update(X64[s, j0:], ids=nid[s, j0:], values=None if XV64 is None else XV64[s, j0:],
                       return_changes=True)
        self._from_lev(s, sk)
        self._record_evicted(s, ch.evicted, nid[s], added[s], ev_ids, ev_cnt)
        added[s, j0:] = np.isin(nid[s, j0:], ch.added)

    def _record_evicted(self, s, gone, nid_row, added_row, ev_ids, ev_cnt):
        # An id that arrived earlier in this call was never reported: it just is not added.
        fresh = np.isin(gone, nid_row[added_row])
        added_row[np.isin(nid_row, gone[fresh])] = False
        old = gone[~fresh]
        k = int(ev_cnt[s])
        ev_ids[s, k : k + old.size] = old
        ev_cnt[s] = k + old.size

    def _refresh(self, s, nid_row=None, added_row=None, ev_ids=None, ev_cnt=None):
        """Exact scores of sketch s's retained keys (as LevSketch's rescore); drop those below eps."""
        st = self._st
        r = int(st.r[s])
        R = st.factor(s)
        kappa = _factor.cond_estimate(R)
        if r:
            tau = _factor.score_rows(R, st.keys64(s), self._rtol, kappa=kappa)
            st.tau[s, :r] = tau
            keep = tau >= self._eps[s]
            if not keep.all():
                gone = st.ids[s, :r][~keep].copy()
                k = int(keep.sum())
                st.KT[s, :, :k] = st.KT[s, :, :r][:, keep]
                st.V[s, :k] = st.V[s, :r][keep]
                st.ids[s, :k] = st.ids[s, :r][keep]
                st.tau[s, :k] = tau[keep]
                st.r[s] = k
                if ev_ids is not None:
                    self._record_evicted(s, gone, nid_row, added_row, ev_ids, ev_cnt)
        self._set_refreshed(s, kappa, R)

    def _set_refreshed(self, s, kappa, R):
        """Rank-one bookkeeping after exact scores: 2-norm condition number and sigma_max^2 (one SVD).

        R is sketch s's factor as a full (d, d) array (``Store.factor``).
        """
        st = self._st
        fro2 = float(np.einsum("ij,ij->", R, R))
        smax2 = fro2 / self._d  # a lower bound on sigma_max^2, when no SVD is taken
        st.dead[s] = False
        # kappa is a 1-norm estimate, <= kappa_1 <= d kappa_2: only above d KAPPA_DECODE is kappa_2 surely too large;
        # an infinite one may be coordinates no key touched (as LevSketch's rank-one path, _decode.py)
        if self._d <= SVD_MAX_D and (kappa <= KAPPA_DECODE * self._d or np.isinf(kappa)):
            kappa, smax, dead = _factor.live_condition(R)
            smax2 = smax * smax
            if dead.size and np.isfinite(kappa):
                st.dead[s, dead] = True
                st.phantom[s] = smax
        st.kappa[s], st.smax2[s] = kappa, smax2
        st.steps[s] = 0
        st.fro2_ref[s] = st.fro2_now[s] = fro2

    # ------------------------------------------------------- LevSketch bridge
    def _slot_bytes(self, s) -> bytes:
        """Sketch s in LevSketch's byte format (the bytes LevSketch.to_bytes writes for the same state)."""
        return _format.dump("LevSketch", slot_fields(self._st, s, self._d, self._eps[s], self._rtol, self._has_v))

    def _to_lev(self, s) -> LevSketch:
        return LevSketch.from_bytes(self._slot_bytes(s))

    def _lev_state(self, sk, caller):
        if (sk.d, sk.rtol) != (self._d, self._rtol):
            raise ValueError(f"{caller}: sketch has (d, rtol)={(sk.d, sk.rtol)}, the engine {(self._d, self._rtol)}.")
        return levsketch_arrays(sk, self._kind, self.value_dim, caller)

    def _from_lev(self, s, sk, state=None):
        f, tau, Kst, Vst = state if state is not None else self._lev_state(sk, "DecodeEngine")
        st = self._st
        r = tau.shape[0]
        st.grow(r)
        st.KT[s, :, :r] = Kst.T
        st.ids[s, :r], st.tau[s, :r] = f["ids"], tau
        if Vst is not None:
            st.V[s, :r] = Vst
        st.r[s], st.n[s], st.e[s] = r, int(f["n"]), int(f["scale_exp"])
        st.id_lo[s], st.id_hi[s] = (int(v) for v in f["id_range"])
        st.set_factor(s, f["R"])
        self._set_refreshed(s, _factor.cond_estimate(f["R"]), f["R"])

    @classmethod
    def from_sketches(cls, sketches, *, dtype="float64") -> DecodeEngine:
        """An engine holding copies of LevSketches (same d and rtol; payloads on all or none).

        Parameters
        ----------
        sketches : sequence of LevSketch, length S >= 1
            The sketches, one per head; each is copied, none is modified.
        dtype : {"float64", "float32", "float16", "bfloat16"}, default "float64"
            Storage precision of keys and payloads; it must store every retained
            key and payload exactly (float64 always does), else ValueError.

        Returns
        -------
        DecodeEngine
            S heads whose sets, scores and ids equal those of ``sketches``.
        """
        caller = "DecodeEngine.from_sketches"
        sks = list(sketches)
        if not sks or not all(isinstance(sk, LevSketch) for sk in sks):
            raise TypeError(f"{caller}: expected a non-empty sequence of LevSketch.")
        dvs = {sk.retained()[2].shape[1] for sk in sks if sk.retained()[2] is not None}
        if len(dvs) > 1:
            raise ValueError(f"{caller}: the sketches carry payloads of different widths {sorted(dvs)}.")
        eng = cls(len(sks), sks[0].d, [sk.eps for sk in sks], dtype=dtype, value_dim=dvs.pop() if dvs else None,
                  rtol=sks[0].rtol)
        states = [eng._lev_state(sk, caller) for sk in sks]
        for s, (sk, state) in enumerate(zip(sks, states)):
            eng._from_lev(s, sk, state)
        return eng

    def to_sketches(self) -> list:
        """One independent :class:`~streamlev.LevSketch` per sketch (keys as float64).

        Returns
        -------
        list of LevSketch, length S
            Head s as a LevSketch with the same retained set, scores and ids.
        """
        with self._lock:
            return [self._to_lev(s) for s in range(self.heads)]

    # ------------------------------------------------------- merge and bytes
    def merge(self, other: DecodeEngine):
        """Fold another engine (same sketches, d, eps, rtol, dtype, value_dim; disjoint ids) into this one.

        Each sketch becomes exactly the sketch of the union of both key sets;
        ``other`` is not modified; on error nothing changes.

        Parameters
        ----------
        other : DecodeEngine
            Same heads, d, eps, rtol, dtype and value_dim; ids disjoint from this engine's.

        Returns
        -------
        self
        """
        caller = "DecodeEngine.merge"
        if not isinstance(other, DecodeEngine):
            raise TypeError(f"{caller}: can only merge another DecodeEngine, got {type(other).__name__}.")
        if other is self:
            raise ValueError(f"{caller}: cannot merge an engine with itself (its ids are not disjoint).")
        mine = (self.heads, self._d, self._eps.tolist(), self._rtol, self._kind, self.value_dim)
        theirs = (other.heads, other._d, other._eps.tolist(), other._rtol, other._kind, other.value_dim)
        if mine != theirs:
            raise ValueError(f"{caller}: incompatible engines: (heads, d, eps, rtol, dtype, value_dim)={mine} "
                             f"here and {theirs} in the other.")
        first, second = (self, other) if id(self) < id(other) else (other, self)
        with first._lock, second._lock:
            merged = []
            for s in range(self.heads):
                a = self._to_lev(s)
                try:
                    a.merge(other._to_lev(s))
                except ValueError as exc:
                    raise ValueError(f"{caller}: sketch {s}: {exc}") from None
                merged.append((a, self._lev_state(a, caller)))
            for s, (a, state) in enumerate(merged):
                self._from_lev(s, a, state)
        return self

    def to_bytes(self) -> bytes:
        """Versioned, CRC32-checked bytes: a header plus every sketch in LevSketch's format.

        Returns
        -------
        bytes
            Loadable with :meth:`from_bytes`.
        """
        with self._lock:
            parts = [self._slot_bytes(s) for s in range(self.heads)]
        blob = b"".join(parts)
        blob += b"\0" * (-len(blob) % 8)
        return _format.dump("DecodeEngine", {
            "heads": np.int64(self.heads), "d": np.int64(self._d), "rtol": np.float64(self._rtol),
            "eps": self._eps, "dtype": np.int64(list(STORAGE).index(self._kind)),
            "value_dim": np.int64(self._dv if self._has_v else -1),
            "lengths": np.array([len(p) for p in parts], np.int64), "blob": np.frombuffer(blob, "<i8")})

    @classmethod
    def from_bytes(cls, data) -> DecodeEngine:
        """Rebuild from :meth:`to_bytes` output; raise ValueError on anything else.

        Parameters
        ----------
        data : bytes-like
            Output of :meth:`to_bytes`.

        Returns
        -------
        DecodeEngine
        """
        caller = "DecodeEngine.from_bytes"
        f = _format.load(data, "DecodeEngine", {
            "heads": ((), "i8"), "d": ((), "i8"), "rtol": ((), "f8"), "eps": (("heads",), "f8"),
            "dtype": ((), "i8"), "value_dim": ((), "i8"), "lengths": (("heads",), "i8"), "blob": (("w",), "i8")})
        lengths, blob = f["lengths"], f["blob"].astype("<i8").tobytes()
        total = int(lengths.sum()) if lengths.size else 0
        if (lengths < 0).any() or len(blob) != total + (-total % 8) or not 0 <= int(f["dtype"]) < len(STORAGE):
            raise ValueError(f"{caller}: inconsistent header (lengths sum {total}, {len(blob)} payload bytes).")
        dv = int(f["value_dim"])
        try:
            eng = cls(int(f["heads"]), int(f["d"]), f["eps"], dtype=list(STORAGE)[int(f["dtype"])],
                      value_dim=None if dv == -1 else dv, rtol=float(f["rtol"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{caller}: invalid parameters in the header: {exc}") from None
        pos, states = 0, []
        for s, k in enumerate(lengths.tolist()):
            try:
                sk = LevSketch.from_bytes(blob[pos : pos + k])
                if sk.eps != eng._eps[s]:
                    raise ValueError(f"eps {sk.eps} differs from the header's {eng._eps[s]}")
                states.append((sk, eng._lev_state(sk, caller)))
            except ValueError as exc:
                raise ValueError(f"{caller}: sketch {s}: {exc}") from None
            pos += k
        for s, (sk, state) in enumerate(states):
            eng._from_lev(s, sk, state)
        return eng


def out_of_range(X64) -> bool:
    """True if some key's largest entry lies outside [2**-251, 2**250) (zero keys excepted): may need rescaling."""
    amax = np.abs(X64).max(axis=-1)
    return bool(((amax >= SAFE_HI) | ((amax > 0) & (amax < SAFE_LO))).any())
