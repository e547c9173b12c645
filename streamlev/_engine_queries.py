"""The read-only queries of :class:`streamlev.DecodeEngine`: scores, sets, retained keys, top-k, keep mask.

One concept: answering per-head questions from the engine's stacked state
(:class:`streamlev._engine_store.Store`). ``EngineQueries`` is a mixin of
DecodeEngine only; it reads ``_st``, ``_eps``, ``_kind``, ``_has_v``, ``_lock``,
``heads`` and calls ``_refresh`` (exact scores) of the engine it is mixed into.
"""

from __future__ import annotations

import numpy as np

from ._engine_store import to_float64
from ._topk import top_k
from ._validation import check_budget, check_dim, check_eps, check_head

__all__ = ["EngineQueries"]

# Every per-head query takes the same ``head`` keyword; its description is written once here.
_HEAD = "head : int, optional (keyword)\n            One head in [0, S); default a list over all heads."


def _head_doc(method):
    method.__doc__ = method.__doc__.replace("{head}", _HEAD)
    return method


class EngineQueries:
    """Per-head queries of a DecodeEngine (``head=None``: a list over all heads)."""

    def _per_head(self, head, fn, caller):
        with self._lock:
            if head is None:
                return [fn(s) for s in range(self.heads)]
            return fn(check_head(head, self.heads, caller=caller))

    def _scores(self, s):
        if self._st.steps[s]:
            self._refresh(s)  # exact scores (the rank-one ones are within the rounding band)
        r = int(self._st.r[s])
        order = np.argsort(self._st.ids[s, :r], kind="stable")
        return self._st.ids[s, :r][order].copy(), self._st.tau[s, :r][order].copy()

    @_head_doc
    def scores(self, *, head: int | None = None):
        """Retained ids (sorted int64) and their exact leverage (float64, each >= eps), of one head or all.

        Parameters
        ----------
        {head}

        Returns
        -------
        (ids, tau) for ``head``, or a list of them over all heads.
        """
        return self._per_head(head, self._scores, "DecodeEngine.scores")

    @_head_doc
    def universal_set(self, eps=None, *, head: int | None = None):
        """Sorted int64 ids with leverage >= eps (default each head's eps, its minimum), of one head or all.

        Parameters
        ----------
        eps : float, optional
            Threshold, >= the head's eps (smaller shares were not kept).
        {head}

        Returns
        -------
        ids : ndarray of int64, shape (u,), sorted (one head) or a list of them over all heads
        """
        caller = "DecodeEngine.universal_set"
        e = None if eps is None else check_eps(eps, caller=caller)

        def one(s):
            want = self._eps[s] if e is None else e
            if want < self._eps[s]:
                raise ValueError(f"{caller}: eps={want!r} is below head {s}'s eps={self._eps[s]!r}; "
                                 "keys with smaller leverage were not kept.")
            ids, tau = self._scores(s)
            return ids[tau >= want]

        return self._per_head(head, one, caller)

    @_head_doc
    def retained(self, *, head: int | None = None):
        """(ids sorted, keys (r, d), values (r, value_dim) or None) in the storage precision, of one head or all.

        Parameters
        ----------
        {head}

        Returns
        -------
        (ids (r,), keys (r, d), values (r, value_dim) or None) for ``head``, or a list of them over all heads.
            bfloat16 storage is returned as float32 (numpy has no bfloat16); the values are exact.
        """
        def one(s):
            st = self._st
            r = int(st.r[s])
            order = np.argsort(st.ids[s, :r], kind="stable")
            K = st.KT[s, :, :r].T[order]
            V = st.V[s, :r][order] if self._has_v else None
            if self._kind == "bfloat16":
                K = to_float64(K, "bfloat16").astype(np.float32)
                V = None if V is None else to_float64(V, "bfloat16").astype(np.float32)
            elif st.e[s] != 0 and st.n[s]:
                K = np.ldexp(K, int(st.e[s]))
            return st.ids[s, :r][order].copy(), np.ascontiguousarray(K), None if V is None else V.copy()

        return self._per_head(head, one, "DecodeEngine.retained")

    @_head_doc
    def top(self, budget, *, head: int | None = None):
        """Sorted ids of the ``budget`` retained keys of largest leverage (ties toward smaller ids), per head.

        Parameters
        ----------
        budget : int >= 1
            How many keys per head (fewer when fewer are retained).
        {head}

        Returns
        -------
        ids : ndarray of int64 (one head) or a list over all heads
        """
        b = check_budget(budget, caller="DecodeEngine.top")

        def pick(s):
            ids, tau = self._scores(s)
            return np.sort(ids[top_k(tau, b)])

        return self._per_head(head, pick, "DecodeEngine.top")

    def keep_mask(self, length: int) -> np.ndarray:
        """Boolean (S, length) array: ``mask[s, j]`` is True iff id j is retained by sketch s.

        For a KV cache indexed by position (the default ids), this is the set of
        cache rows to keep; ids outside [0, length) are ignored.

        Parameters
        ----------
        length : int >= 0
            Number of positions (columns of the mask).

        Returns
        -------
        mask : ndarray of bool, shape (S, length)
        """
        length = check_dim(length, name="length", caller="DecodeEngine.keep_mask") if length else 0
        with self._lock:
            st = self._st
            mask = np.zeros((self.heads, length), bool)
            live = np.arange(st.cap)[None, :] < st.r[:, None]
            rows = np.broadcast_to(np.arange(self.heads)[:, None], live.shape)[live]
            cols = st.ids[live]
            ok = (cols >= 0) & (cols < length)
            mask[rows[ok], cols[ok]] = True
            return mask
