"""Id bookkeeping of a sketch: the range of ids seen and the checks that catch reused ids.

Ids of evicted keys are not stored (bounded memory), but when a sketch's ids are
exactly the interval [lo, hi] (the default running positions, or one shard's row
range) any id inside it is known to be taken. That catches the common mistake of
merging two sketches that both counted ids from 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IdRange", "check_not_retained"]


class IdRange:
    """Smallest and largest id seen by a sketch (``lo > hi`` when none)."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo: int = 0, hi: int = -1):
        self.lo, self.hi = int(lo), int(hi)

    def state(self) -> tuple:
        return self.lo, self.hi

    def as_array(self) -> np.ndarray:
        return np.array([self.lo, self.hi], dtype=np.int64)

    def is_interval(self, n: int) -> bool:
        """True when the ``n`` ids seen are exactly lo..hi."""
        return n > 0 and self.hi - self.lo + 1 == n

    def overlaps(self, lo: int, hi: int) -> bool:
        return lo <= self.hi and hi >= self.lo

    def contains(self, i: int) -> bool:
        return self.lo <= i <= self.hi

    def check_fresh(self, ids: np.ndarray, n: int, caller: str) -> None:
        """Raise if any of ``ids`` is known to be taken (the seen ids form the interval lo..hi)."""
        if self.is_interval(n):
            inside = ids[(ids >= self.lo) & (ids <= self.hi)]
            if inside.size:
                raise ValueError(f"{caller}: id(s) {inside[:5].tolist()} were already used: this sketch has seen "
                                 f"exactly the ids {self.lo}..{self.hi}. Pass fresh ids "
                                 "(e.g. ids=np.arange(n0, n0 + m)).")

    def extend(self, lo: int, hi: int, count: int) -> None:
        """Record that ``count`` ids in [lo, hi] were added."""
        if count <= 0:
            return
        if self.hi < self.lo:
            self.lo, self.hi = int(lo), int(hi)
        else:
            self.lo, self.hi = min(self.lo, int(lo)), max(self.hi, int(hi))

    @classmethod
    def from_array(cls, id_range, n: int, ids: np.ndarray, caller: str) -> IdRange:
        """Decode a serialized range after checking it can hold n distinct ids including the retained ones."""
        lo, hi = (int(v) for v in id_range)
        if (n == 0 and (lo, hi) != (0, -1)) or (n > 0 and (hi < lo or hi - lo + 1 < n)) \
                or (ids.size and (ids[0] < lo or ids[-1] > hi)):
            raise ValueError(f"{caller}: id range [{lo}, {hi}] is inconsistent with n={n} and the ids.")
        return cls(lo, hi)


def check_disjoint(a: IdRange, a_n: int, a_ids: np.ndarray, b: IdRange, b_n: int, b_ids: np.ndarray,
                   caller: str) -> None:
    """Raise if two sketches about to merge are known to share ids."""
    if a.is_interval(a_n) and b.is_interval(b_n) and a.overlaps(b.lo, b.hi):
        raise ValueError(f"{caller}: the sketches' ids overlap: this one has seen ids {a.lo}..{a.hi}, the other "
                         f"{b.lo}..{b.hi}. Build shards with disjoint ids (update(keys, ids=offset + np.arange(m))).")
    if b_ids.size:
        a.check_fresh(b_ids, a_n, caller)
    if a_ids.size:
        b.check_fresh(a_ids, b_n, caller)


def check_not_retained(new: np.ndarray, retained: np.ndarray, caller: str, *, merging: bool = False) -> None:
    """Raise if any id of ``new`` is currently retained."""
    if retained.size and new.size:
        hit = np.isin(new, retained)
        if hit.any():
            clash = new[hit][:5].tolist()
            if merging:
                raise ValueError(f"{caller}: id(s) {clash} are retained by both sketches; merged sketches must be "
                                 "built on disjoint ids (pass ids= to update).")
            raise ValueError(f"{caller}: id(s) {clash} are already retained by this sketch; ids must be distinct "
                             "across updates.")
