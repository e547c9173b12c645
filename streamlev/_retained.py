"""Storage of the rows a sketch retains: scaled keys, ids, one score per row and an optional payload.

Arrays have spare capacity (amortized O(1) appends on the decode path); only the
first ``r`` rows are live. Capacity never grows past ``limit`` (the sketch's size
bound) unless one call needs more rows at once, and :meth:`fit` gives such a
transient excess back, so ``nbytes`` stays within the bound's storage after a call. Rows are unordered; :meth:`RetainedRows.sorted` gives
them by id (the canonical order of the byte format).
"""

from __future__ import annotations

import numpy as np

__all__ = ["RetainedRows"]


class RetainedRows:
    """Keys (r, d), ids (r,), scores (r,) and optional values (r, dv) of the retained rows."""

    def __init__(self, d: int, limit: int | None = None):
        self.limit = limit  # the sketch's size bound (rows), or None for no cap
        self.K = np.zeros((0, d))
        self.ids = np.zeros(0, dtype=np.int64)
        self.score = np.zeros(0)
        self.V = None  # optional (r, dv) payload
        self.r = 0

    # ------------------------------------------------------------------ views
    @property
    def live_ids(self) -> np.ndarray:
        return self.ids[: self.r]

    @property
    def live_keys(self) -> np.ndarray:
        return self.K[: self.r]

    @property
    def live_scores(self) -> np.ndarray:
        return self.score[: self.r]

    @property
    def dv(self):
        """Payload width, or None when the rows carry no values."""
        return None if self.V is None else self.V.shape[1]

    @property
    def nbytes(self) -> int:
        arrays = [self.K, self.ids, self.score] + ([] if self.V is None else [self.V])
        return int(sum(a.nbytes for a in arrays))

    def sorted(self):
        """(ids, keys, scores, values or None) of the live rows, by id (new arrays)."""
        r = self.r
        order = np.argsort(self.ids[:r], kind="stable")
        V = None if self.V is None else self.V[:r][order]
        return self.ids[:r][order], self.K[:r][order], self.score[:r][order], V

    # ------------------------------------------------------------ transactions
    def snapshot(self) -> tuple:
        r = self.r
        return (self.K[:r].copy(), self.ids[:r].copy(), self.score[:r].copy(),
                None if self.V is None else self.V[:r].copy())

    def restore(self, snap: tuple) -> None:
        self.set(*snap)

    def set(self, K, ids, score, V=None) -> None:
        """Replace every row (the arrays are taken over, not copied)."""
        self.K, self.ids, self.score, self.V = K, ids, score, V
        self.r = int(ids.shape[0])

    # ---------------------------------------------------------------- changes
    def append(self, X, ids, score, V, V_block) -> None:
        """Add rows; ``V_block`` (the whole block's payload, possibly empty) switches the payload on."""
        k = X.shape[0]
        if V_block is not None and self.V is None:
            self.V = np.zeros((self.K.shape[0], V_block.shape[1]))
        if k == 0:
            return
        r = self.r
        need = r + k
        if need > self.K.shape[0]:
            cap = max(2 * self.K.shape[0], 16)
            if self.limit is not None:
                cap = min(cap, self.limit)
            self._resize(max(need, cap))
        self.K[r:need] = X
        self.ids[r:need] = ids
        self.score[r:need] = score
        if self.V is not None:
            self.V[r:need] = V
        self.r = need

    def fit(self) -> None:
        """Give back capacity above ``max(r, limit)`` (left by a call that needed more rows at once)."""
        if self.limit is not None and self.K.shape[0] > max(self.r, self.limit):
            self._resize(max(self.r, self.limit))

    def _resize(self, cap: int) -> None:
        r = self.r
        self.K = _grow(self.K, cap, r)
        self.ids = _grow(self.ids, cap, r)
        self.score = _grow(self.score, cap, r)
        if self.V is not None:
            self.V = _grow(self.V, cap, r)

    def compact(self, keep: np.ndarray) -> np.ndarray:
        """Drop the live rows where ``keep`` is False; returns their ids. The order of the rest may change."""
        drop = np.flatnonzero(~keep)
        if drop.size <= 8:
            return self.drop(drop)
        r = self.r
        gone = self.ids[drop].copy()
        idx = np.flatnonzero(keep)
        k = idx.size
        self.K[:k] = self.K[:r][idx]
        self.ids[:k] = self.ids[:r][idx]
        self.score[:k] = self.score[:r][idx]
        if self.V is not None:
            self.V[:k] = self.V[:r][idx]
        self.r = k
        return gone

    def drop(self, idx: np.ndarray) -> np.ndarray:
        """Drop the rows at positions idx (a few; any order) by moving the last rows into the holes."""
        idx = np.sort(idx)
        gone = self.ids[idx].copy()
        r = self.r
        for j in idx[::-1].tolist():  # from the back, so every row moved in is one that stays
            r -= 1
            if j != r:
                self.K[j] = self.K[r]
                self.ids[j] = self.ids[r]
                self.score[j] = self.score[r]
                if self.V is not None:
                    self.V[j] = self.V[r]
        self.r = r
        return gone


def _grow(a, cap, r):
    out = np.zeros((cap,) + a.shape[1:], dtype=a.dtype)
    out[:r] = a[:r]
    return out
