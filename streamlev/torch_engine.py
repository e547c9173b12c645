"""TorchDecodeEngine: the exact p=2 decode step of :class:`~streamlev.DecodeEngine` on torch tensors.

For KV caches that live on an accelerator: all sketches' state is a few
stacked tensors on the cache's device and one token is a fixed sequence of
batched tensor operations, so the host never waits for the device per token.

How it stays exact without looking at the data per token: per token the
retained scores are lowered with the Sherman-Morrison formula on the stacked
inverse Gram matrices (float64), and a key is dropped only when its score is
below eps by more than the rounding band of those updates (the band of
:class:`~streamlev.LevSketch`'s rank-one path); keys inside the band are kept.
So between refreshes the retained set is a *superset* of the exact set (no
false negatives, at most a few extra keys within ~1e-6 of eps). Every
``refresh_every`` tokens, and before any query, an exact refresh (batched QR
of the factor with the pending keys and the ridge, exact scores of every
retained key) makes it exactly the offline set again; that refresh is the one
place the host reads from the device (buffer sizes, condition numbers).

Needs torch (``pip install torch``); importing this module imports torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ._constants import DEFAULT_RTOL, KAPPA_DECODE
from ._validation import check_dim, check_eps, check_rtol

__all__ = ["TorchDecodeEngine", "TorchChanges"]

_U = float(np.finfo(np.float64).eps)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TorchChanges(NamedTuple):
    """Changes of one :meth:`TorchDecodeEngine.update`, as device tensors (no host sync).

    ``added`` (S, t) bool: new key j of sketch s is retained (its id is ``ids[s, j]``);
    ``evicted`` (S, cap) int64: ids retained before the call and dropped by it, -1 elsewhere.
    """

    added: torch.Tensor
    evicted: torch.Tensor


class TorchDecodeEngine:
    """Exact universal sets (leverage >= eps) of S key streams, updated per token on the keys' device.

    Parameters
    ----------
    heads : int
        Number of key streams S (layers x KV heads, flattened).
    d : int
        Key dimension.
    eps : float
        Threshold, in (0, 1], shared by all sketches.
    dtype : {"float16", "bfloat16", "float32"} or torch dtype, default torch.float16
        Storage precision of retained keys and payloads; keys are rounded to it
        once and all scores are computed in float64 on the rounded values.
    value_dim : int, optional
        Width of a payload row stored with each key.
    device : torch.device or str, optional
        Device of the state (default: CPU; ``update`` expects keys there).
    rtol : float, default 1e-13
        Relative ridge of the leverage definition.
    refresh_every : int, optional
        Tokens between exact refreshes (default ``max(32, d)``).

    Notes
    -----
    Guarantee, per sketch: after :meth:`refresh` (called by every query), the
    retained ids are exactly ``{j : tau_j(K) >= eps}`` over the keys as stored,
    as in :class:`~streamlev.DecodeEngine` (results agree with it to rounding).
    Between refreshes the retained set contains that set (no false negatives).
    ``update`` syncs with the host only when ``check_finite`` is True (one bool
    per call) and at refreshes.
    """

    def __init__(self, heads: int, d: int, eps: float, *, dtype=torch.float16, value_dim: int | None = None,
                 device=None, rtol: float = DEFAULT_RTOL, refresh_every: int | None = None):
        caller = "TorchDecodeEngine"
        S = check_dim(heads, name="heads", caller=caller)
        self._d = d = check_dim(d, caller=caller)
        self._eps = check_eps(eps, caller=caller)
        name = str(dtype).replace("torch.", "")
        if name not in _DTYPES:
            raise ValueError(f"{caller}: dtype must be one of {sorted(_DTYPES)}; got {dtype!r}. (float64 keys "
                             "may need rescaling: use streamlev.DecodeEngine.)")
        self._dtype = _DTYPES[name]
        self._rtol = check_rtol(rtol, caller=caller)
        self._dv = 0 if value_dim is None else check_dim(value_dim, name="value_dim", caller=caller)
        self._has_v = value_dim is not None
        self._T = max(32, d) if refresh_every is None else check_dim(refresh_every, name="refresh_every",
                                                                      caller=caller)
        dev = torch.device("cpu" if device is None else device)
        f8 = dict(dtype=torch.float64, device=dev)
        self._dev = dev
        self._R = torch.zeros(S, d, d, **f8)
        self._Ginv = torch.zeros(S, d, d, **f8)
        self._pend = torch.zeros(S, self._T, d, **f8)  # keys since the last refresh (not yet in R)
        self._np = 0  # how many of them (the same for every sketch)
        cap = int(math.floor(d / self._eps)) + self._T + 1
        self._K = torch.zeros(S, cap, d, dtype=self._dtype, device=dev)
        self._V = torch.zeros(S, cap, self._dv, dtype=self._dtype, device=dev)
        self._ids = torch.full((S, cap), -1, dtype=torch.int64, device=dev)
        self._tau = torch.zeros(S, cap, **f8)
        self._valid = torch.zeros(S, cap, dtype=torch.bool, device=dev)
        self._k2 = torch.full((S,), math.inf, **f8)  # kappa(R)^2 at the last refresh
        self._fro2_ref = torch.zeros(S, **f8)
        self._fro2 = torch.zeros(S, **f8)
        self._smax2 = torch.zeros(S, **f8)  # sigma_max(R)^2 at the last refresh
        self._n = np.zeros(S, np.int64)  # host: every sketch gets t keys per call, so no sync is needed
        self._n_dev = torch.zeros(S, dtype=torch.int64, device=dev)  # the same on the device: default ids
        self._id_lo, self._id_hi = np.zeros(S, np.int64), np.full(S, -1, np.int64)
        self._steps = 0
        self._ready = False
        self._dead = torch.zeros(S, d, **f8)  # 1.0 on coordinates no key had touched at the last refresh
        self._tainted = torch.zeros(S, dtype=torch.bool, device=dev)  # a key touched one since: keep everything

    # ------------------------------------------------------------ properties
    @property
    def heads(self) -> int:
        """Number of key streams S."""
        return self._R.shape[0]

    @property
    def d(self) -> int:
        return self._d

    @property
    def eps(self) -> float:
        return self._eps

    @property
    def n(self) -> np.ndarray:
        """Keys seen per sketch (host array, a copy)."""
        return self._n.copy()

    @property
    def nbytes(self) -> int:
        ts = [self._R, self._Ginv, self._pend, self._K, self._V, self._ids, self._tau, self._valid]
        return int(sum(t.numel() * t.element_size() for t in ts))

    # ---------------------------------------------------------------- update
    def update(self, keys, values=None, ids=None, *, check_finite: bool = True, return_changes: bool = False):
        """Fold t new keys into every sketch.

        Parameters
        ----------
        keys : torch.Tensor of shape (S, t, d) or (S, d), on the engine's device
        values : torch.Tensor of shape (S, t, value_dim) or (S, value_dim), optional
        ids : array_like of int of shape (t,) or (S, t), host side, optional
            Fresh ids (above or below every id used so far), copied to the device (one host-to-device
            transfer per call); default ``n[s], ..., n[s] + t - 1``, built on the device.
        check_finite : bool, default True
            Reject NaN/Inf keys (costs one host sync per call; pass False in a
            decode loop whose keys are known finite).
        return_changes : bool, default False
            Return a :class:`TorchChanges` instead of self.
        """
        caller = "TorchDecodeEngine.update"
        X, XV, nid = self._check(keys, values, ids, check_finite, caller)
        S, t = nid.shape
        if ids is None:  # built on the device: a host-to-device copy would wait for the stream each token
            ids_dev = self._n_dev.unsqueeze(1) + torch.arange(t, dtype=torch.int64, device=self._dev)
        else:
            ids_dev = torch.as_tensor(nid, device=self._dev)
        vb, ib = (self._valid.clone(), self._ids.clone()) if return_changes else (None, None)
        added = torch.zeros(S, t, dtype=torch.bool, device=self._dev)
        self._n += t
        self._n_dev += t
        moved = True  # retained keys changed slots (exact step or refresh)
        if t == 1 and self._ready:
            self._rank_one(X[:, 0], None if XV is None else XV[:, 0], ids_dev[:, 0], added[:, 0])
            moved = self._np == self._T
            if moved:
                self._refresh()
                added &= self._present(ids_dev)
        elif t:
            self._exact_step(X, XV, ids_dev, added)
        if t:
            lo, hi = nid.min(axis=1), nid.max(axis=1)
            fresh = self._id_hi < self._id_lo
            self._id_lo = np.where(fresh, lo, np.minimum(self._id_lo, lo))
            self._id_hi = np.where(fresh, hi, np.maximum(self._id_hi, hi))
        if not return_changes:
            return self
        if moved:
            gone = vb & ~self._present(ib)
        else:  # slots stay put on the rank-one path: a slot lost its key if it is free or holds another id now
            gone = vb & ~(self._valid & (self._ids == ib))
        return TorchChanges(added, torch.where(gone, ib, torch.full_like(ib, -1)))

    def _present(self, q):
        """(S, m) bool: q[s, j] is a retained id of sketch s (sort + binary search, batched)."""
        live = torch.where(self._valid, self._ids, torch.full_like(self._ids, -2)).sort(dim=1).values
        pos = torch.searchsorted(live, q.contiguous()).clamp(max=live.shape[1] - 1)
        return torch.gather(live, 1, pos) == q

    def _check(self, keys, values, ids, check_finite, caller):
        S, d = self.heads, self._d
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"{caller}: keys must be a torch.Tensor; got {type(keys).__name__}.")
        if not keys.is_floating_point() or keys.device != self._dev:
            raise TypeError(f"{caller}: keys must be a floating tensor on {self._dev}; got {keys.dtype} on {keys.device}.")
        one = keys.dim() == 2
        K = keys.unsqueeze(1) if one else keys
        if K.dim() != 3 or K.shape[0] != S or K.shape[2] != d:
            raise ValueError(f"{caller}: keys must have shape ({S}, t, {d}) or ({S}, {d}); got {tuple(keys.shape)}.")
        t = K.shape[1]
        X = K.to(self._dtype).to(torch.float64)  # rounded once to the storage precision
        if check_finite and t and not bool(torch.isfinite(X).all()):
            raise ValueError(f"{caller}: keys contain NaN or Inf (after rounding to {self._dtype}); nothing changed.")
        XV = None
        if self._has_v:
            if not isinstance(values, torch.Tensor):
                raise ValueError(f"{caller}: this engine stores payloads; pass values of shape ({S}, {t}, {self._dv}).")
            XV = values.unsqueeze(1) if (values.dim() == 2 and one) else values
            if tuple(XV.shape) != (S, t, self._dv) or XV.device != self._dev:
                raise ValueError(f"{caller}: values must have shape ({S}, {t}, {self._dv}) on {self._dev}; "
                                 f"got {tuple(values.shape)} on {values.device}.")
            XV = XV.to(self._dtype)
        elif values is not None:
            raise ValueError(f"{caller}: this engine was built without value_dim; values cannot be stored.")
        if ids is None:
            nid = self._n[:, None] + np.arange(t, dtype=np.int64)[None, :]
        else:
            arr = np.asarray(ids)
            if arr.dtype.kind not in "iu":
                raise TypeError(f"{caller}: ids must be integers; got dtype {arr.dtype}.")
            nid = np.ascontiguousarray(np.broadcast_to(arr, (S, t)) if arr.shape == (t,) else arr, dtype=np.int64)
            if nid.shape != (S, t):
                raise ValueError(f"{caller}: ids must have shape ({t},) or ({S}, {t}); got {arr.shape}.")
            srt = np.sort(nid, axis=1)
            used = (self._id_hi >= self._id_lo)[:, None] & (nid >= self._id_lo[:, None]) & (nid <= self._id_hi[:, None])
            if (srt[:, 1:] == srt[:, :-1]).any() or used.any():
                raise ValueError(f"{caller}: ids must be distinct and outside the range of ids used so far.")
        return X, XV, nid

    def _rank_one(self, x, xv, nid, added):
        """One key per sketch: Sherman-Morrison on the inverse Gram and on every retained score."""
        eps, d = self._eps, self._d
        u = torch.bmm(self._Ginv, x.unsqueeze(2)).squeeze(2)
        h = (x * u).sum(1)
        self._Ginv -= (u / (1.0 + h).unsqueeze(1)).unsqueeze(2) * u.unsqueeze(1)
        tau_x = h / (1.0 + h)
        c = self._products(self._K, u.unsqueeze(2)).squeeze(2)
        self._tau -= c * c / (1.0 + h).unsqueeze(1)
        self._pend[:, self._np] = x
        self._np += 1
        self._steps += 1
        self._fro2 += (x * x).sum(1)
        k2 = self._k2 * (1.0 + (self._fro2 - self._fro2_ref) / self._smax2)  # as DecodeEngine (Weyl)
        # A key on a coordinate no key had touched makes the inverse Gram (built with a stand-in there)
        # wrong for this sketch until the next exact refresh: until then it keeps every key (a superset).
        self._tainted |= (x.abs() * self._dead).sum(1) > 0
        bad = ~(k2 <= KAPPA_DECODE**2) | self._tainted
        margin = torch.where(bad, 1.0, torch.clamp(64.0 * self._steps * _U * k2 * d, max=1.0))
        fresh = torch.where(bad, 1.0, torch.minimum(margin, 64.0 * _U * k2 * d))
        # Drop only keys certainly below eps; keys inside the band stay until the next exact refresh.
        self._valid &= ~(self._tau < eps - margin.unsqueeze(1))
        admit = tau_x >= eps - fresh
        slot = torch.argmin(self._valid.to(torch.int8), dim=1)  # first free slot (capacity is kept ample)
        rows = torch.arange(self.heads, device=self._dev)
        a1 = admit.unsqueeze(1)
        self._K[rows, slot] = torch.where(a1, x.to(self._dtype), self._K[rows, slot])
        if xv is not None:
            self._V[rows, slot] = torch.where(a1, xv, self._V[rows, slot])
        self._ids[rows, slot] = torch.where(admit, nid, self._ids[rows, slot])
        self._tau[rows, slot] = torch.where(admit, tau_x, self._tau[rows, slot])
        self._valid[rows, slot] |= admit
        added |= admit

    def _exact_step(self, X, XV, nid, added):
        """Fold a block exactly: candidates are the retained keys and the new ones, all scored from scratch."""
        S, t, d = X.shape
        Kc = torch.cat([self._K, X.to(self._dtype)], dim=1)
        Vc = torch.cat([self._V, XV if XV is not None else self._V.new_zeros(S, t, self._dv)], dim=1)
        idc = torch.cat([self._ids, nid], dim=1)
        validc = torch.cat([self._valid, torch.ones(S, t, dtype=torch.bool, device=self._dev)], dim=1)
        self._fold_pending(X)
        tau = self._exact_scores(Kc)
        keep = validc & (tau >= self._eps)
        self._store(Kc, Vc, idc, tau, keep)
        added |= keep[:, -t:]
        self._after_refresh()

    def _fold_pending(self, X=None):
        blocks = [self._R, self._pend[:, : self._np]] + ([] if X is None else [X])
        A = torch.cat(blocks, dim=1)
        self._R = _positive_r(torch.linalg.qr(A, mode="r")[1][:, : self._d])
        self._np = 0

    def _exact_scores(self, Kc):
        """x^T (R^T R + lam I)^{-1} x for every candidate row (the ridge of streamlev.reference)."""
        d = self._d
        fro2 = (self._R * self._R).sum((1, 2))
        lam = (self._rtol**2) * fro2
        eye = torch.eye(d, dtype=torch.float64, device=self._dev).expand(self.heads, d, d)
        Rl = _positive_r(torch.linalg.qr(torch.cat([self._R, lam.sqrt()[:, None, None] * eye], dim=1), mode="r")[1])
        empty = fro2 == 0
        Rl = torch.where(empty[:, None, None], eye, Rl)  # no keys seen: every score is 0 (set below)
        Lt = Rl.transpose(1, 2)
        tau = torch.empty(Kc.shape[:2], dtype=torch.float64, device=self._dev)
        for a, b in self._chunks(Kc):
            Y = torch.linalg.solve_triangular(Lt[a:b], Kc[a:b].to(torch.float64).transpose(1, 2), upper=False)
            tau[a:b] = torch.clamp((Y * Y).sum(1), max=1.0)
        return torch.where(empty[:, None], torch.zeros_like(tau), tau)

    def _chunks(self, K):
        """Sketch ranges whose keys widened to float64 take at most ~64 MB (bounded temporaries)."""
        per = max(1, (64 << 20) // max(1, K.shape[1] * K.shape[2] * 8))
        return [(a, min(a + per, K.shape[0])) for a in range(0, K.shape[0], per)]

    def _products(self, K, u):
        """K @ u in float64 for stored (narrow) keys K (S, m, d) and u (S, d, 1)."""
        if len(self._chunks(K)) == 1:
            return torch.bmm(K.to(torch.float64), u)
        return torch.cat([torch.bmm(K[a:b].to(torch.float64), u[a:b]) for a, b in self._chunks(K)])

    def _store(self, Kc, Vc, idc, tau, keep):
        """Compact the kept candidates to the front of buffers sized to the largest count (one host sync)."""
        cap = int(keep.sum(1).max()) + self._T + 1  # room for every key admitted before the next refresh
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :cap]
        if order.shape[1] < cap:  # more room than candidates: pad with (invalid) copies of slot 0
            order = torch.cat([order, order.new_zeros(order.shape[0], cap - order.shape[1])], dim=1)
        take = lambda a: torch.gather(a, 1, order if a.dim() == 2 else order.unsqueeze(2).expand(-1, -1, a.shape[2]))  # noqa: E731
        self._K, self._V, self._ids, self._tau = take(Kc), take(Vc), take(idc), take(tau)
        pos = torch.arange(cap, device=self._dev).unsqueeze(0)
        self._valid = pos < keep.sum(1, keepdim=True)

    def _after_refresh(self):
        R = self._R
        # Coordinates no key has touched (zero row and column of R; real Gemma 3 keys have 4-8 of 256) get
        # sigma_max(R) on the diagonal: kappa is then the other coordinates', and keys that do not touch
        # them see the same inverse Gram on the rest (as DecodeEngine, streamlev/_decode.py).
        nz = R != 0
        dead = ~nz.any(2) & ~nz.any(1)
        sv = torch.linalg.svdvals(R)  # descending; an untouched coordinate adds a zero at the end
        smax = sv[:, 0]
        smin = sv.gather(1, (self._d - 1 - dead.sum(1)).clamp_min(0).unsqueeze(1)).squeeze(1)  # of the others
        kappa = torch.where(smin > 0, smax / smin, torch.full_like(smax, math.inf))
        Rp = R + torch.diag_embed(dead * smax.unsqueeze(1))
        self._k2 = kappa * kappa
        self._smax2 = smax * smax
        self._fro2 = self._fro2_ref = (R * R).sum((1, 2))
        self._dead = dead.to(torch.float64)
        self._tainted = torch.zeros_like(self._tainted)
        self._steps = 0
        ok = bool((self._n >= self._d).all()) and bool((kappa <= KAPPA_DECODE).all())
        if ok:
            self._Ginv = torch.cholesky_inverse(Rp, upper=True)
        self._ready = ok

    def refresh(self):
        """Exact scores of every retained key (and the pending keys folded into the factor); prune below eps."""
        self._fold_pending()
        tau = self._exact_scores(self._K)
        keep = self._valid & (tau >= self._eps)
        self._store(self._K, self._V, self._ids, tau, keep)
        self._after_refresh()
        return self

    _refresh = refresh

    # ---------------------------------------------------------------- queries
    def keep_mask(self, length: int) -> torch.Tensor:
        """Device bool tensor (S, length): id j retained by sketch s (a superset between refreshes)."""
        mask = torch.zeros(self.heads, length + 1, dtype=torch.bool, device=self._dev)
        col = torch.where(self._valid & (self._ids >= 0) & (self._ids < length), self._ids,
                          torch.full_like(self._ids, length))
        mask.scatter_(1, col, True)
        return mask[:, :length]

    def scores(self, *, head: int | None = None):
        """Sorted retained ids and their exact leverage as numpy, of one head or (None) a list over all (refreshes first)."""
        self.refresh()
        valid, ids, tau = self._valid.cpu().numpy(), self._ids.cpu().numpy(), self._tau.cpu().numpy()

        def one(s):
            i, t = ids[s][valid[s]], tau[s][valid[s]]
            order = np.argsort(i, kind="stable")
            return i[order], t[order]

        return [one(s) for s in range(self.heads)] if head is None else one(self._head(head))

    def universal_set(self, eps: float | None = None, *, head: int | None = None):
        """Sorted ids with leverage >= eps (default the engine's eps) as numpy, of one head or a list over all."""
        e = self._eps if eps is None else check_eps(eps, caller="TorchDecodeEngine.universal_set")
        if e < self._eps:
            raise ValueError(f"TorchDecodeEngine.universal_set: eps={e!r} is below the engine's eps={self._eps!r}.")
        got = self.scores(head=head)
        return [i[t >= e] for i, t in got] if head is None else got[0][got[1] >= e]

    def _head(self, head) -> int:
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= int(head) < self.heads:
            raise ValueError(f"TorchDecodeEngine: head must be an int in [0, {self.heads}); got {head!r}.")
        return int(head)

    def num_retained(self) -> torch.Tensor:
        """Keys held per sketch, (S,) int64 device tensor."""
        return self._valid.sum(1)


def _positive_r(R):
    """R with a non-negative diagonal (rows flipped), upper triangular."""
    sign = torch.where(torch.diagonal(R, dim1=1, dim2=2) < 0, -1.0, 1.0).to(R.dtype)
    return torch.triu(R * sign.unsqueeze(2))
