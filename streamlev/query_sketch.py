"""QuerySketch: a mergeable summary of the attention queries seen so far (count, mean, second moment).

Query-aware key selectors (:mod:`streamlev.selectors`) may use what the past
queries looked like, never the future queries they are evaluated on. This
sketch holds exactly three sufficient statistics -- the count ``n``, the sum
``s = sum_i q_i`` (d) and the raw second moment ``S = sum_i q_i q_i^T`` (d x d)
-- so the mean ``mu = s/n``, the covariance ``S/n - mu mu^T`` and the span of
the queries (the range of ``S``) are available at any time in O(d^2) memory.
"""

from __future__ import annotations

import numpy as np

from . import _format
from ._sketch_base import Sketch, locked
from ._validation import check_dim, check_keys

__all__ = ["QuerySketch"]


class QuerySketch(Sketch):
    """Count, mean and second moment of a stream of d-dimensional queries; mergeable.

    Parameters
    ----------
    d : int
        Query dimension.

    Notes
    -----
    Guarantee: after any sequence of ``update`` and ``merge`` calls over
    queries Q (any block sizes, order or partition), ``n == len(Q)``,
    ``sum == Q.sum(0)`` and ``second_moment == Q.T @ Q`` up to float64
    summation rounding (exact when all partial sums are exactly representable,
    e.g. small-integer queries). Memory is ``d^2 + d + 1`` floats, independent
    of the number of queries. The sketch holds no individual query.

    Thread safety: public methods hold an internal lock.

    Examples
    --------
    >>> import numpy as np
    >>> from streamlev.query_sketch import QuerySketch
    >>> Q = np.random.default_rng(0).standard_normal((100, 4))
    >>> a = QuerySketch(4).update(Q[:30]); b = QuerySketch(4).update(Q[30:])
    >>> bool(np.allclose(a.merge(b).mean, Q.mean(0)))
    True
    """

    def __init__(self, d: int):
        super().__init__()
        self._d = check_dim(d, caller="QuerySketch")
        self._n = 0
        self._s = np.zeros(self._d)
        self._S = np.zeros((self._d, self._d))

    sum = property(lambda self: self._copy_of("_s"), doc="Sum of the queries, shape (d,) (a copy).")
    second_moment = property(lambda self: self._copy_of("_S"),
                             doc="Raw second moment ``sum_i q_i q_i^T``, shape (d, d), symmetric (a copy).")

    def _copy_of(self, name):
        with self._lock:
            return getattr(self, name).copy()

    @property
    def mean(self) -> np.ndarray:
        """Mean query, shape (d,); zeros when empty."""
        with self._lock:
            return self._s / self._n if self._n else np.zeros(self._d)

    @property
    def covariance(self) -> np.ndarray:
        """Population covariance ``S/n - mu mu^T``, shape (d, d), symmetric PSD up to rounding; zeros when empty."""
        with self._lock:
            if not self._n:
                return np.zeros((self._d, self._d))
            mu = self._s / self._n
            C = self._S / self._n - np.outer(mu, mu)
            return (C + C.T) / 2.0

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics (sum and second moment)."""
        return int(self._s.nbytes + self._S.nbytes)

    def _snapshot(self):
        return self._n, self._s.copy(), self._S.copy()

    def _restore(self, snap):
        self._n, self._s, self._S = snap

    def __repr__(self) -> str:
        return f"QuerySketch(d={self._d}; n={self._n})"

    def update(self, queries) -> QuerySketch:
        """Fold a block of queries into the sketch.

        Parameters
        ----------
        queries : array_like of shape (m, d) or (d,)
            Finite queries; non-finite ones raise ValueError and leave the sketch unchanged.

        Returns
        -------
        QuerySketch
            self.
        """
        Q = check_keys(queries, self._d, caller="QuerySketch.update", name="queries", check_finite=True)
        Q = np.asarray(Q, dtype=np.float64)
        if Q.shape[0] == 0:
            return self
        s = Q.sum(axis=0)
        S = Q.T @ Q
        S = (S + S.T) / 2.0  # BLAS may leave a last-bit asymmetry; the statistic is symmetric
        with self._lock:
            self._n += Q.shape[0]
            self._s += s
            self._S += S
        return self

    def merge(self, other: QuerySketch) -> QuerySketch:
        """Add another sketch's statistics (queries of a disjoint part of the stream).

        Parameters
        ----------
        other : QuerySketch
            Same d; not modified.

        Returns
        -------
        QuerySketch
            self.
        """
        self._check_other(other, "QuerySketch.merge")
        if other._d != self._d:
            raise ValueError(f"QuerySketch.merge: dimensions differ ({self._d} here, {other._d} in the other "
                             "sketch); only sketches of queries of one head merge.")
        with locked(self, other):
            n, s, S = other._n, other._s.copy(), other._S.copy()
            self._n += n
            self._s += s
            self._S += S
        return self

    def _to_bytes(self) -> bytes:
        """Write this class's fields (see :meth:`Sketch.to_bytes`)."""
        with self._lock:
            return _format.dump("QuerySketch", {"d": np.int64(self._d), "n": np.int64(self._n),
                                                "sum": self._s, "second_moment": self._S})

    @classmethod
    def _from_bytes(cls, data) -> QuerySketch:
        """Parse and check QuerySketch bytes (see :meth:`Sketch.from_bytes`)."""
        f = _format.load(data, "QuerySketch", {"d": ((), "i8"), "n": ((), "i8"), "sum": (("d",), "f8"),
                                                "second_moment": (("d", "d"), "f8")})
        d, n = int(f["d"]), int(f["n"])
        if d < 1 or n < 0 or f["sum"].shape != (d,) or f["second_moment"].shape != (d, d):
            raise ValueError(f"QuerySketch.from_bytes: inconsistent sizes (d={d}, n={n}).")
        if not (np.isfinite(f["sum"]).all() and np.isfinite(f["second_moment"]).all()):
            raise ValueError("QuerySketch.from_bytes: statistics contain NaN or Inf.")
        sk = cls(d)
        sk._n, sk._s, sk._S = n, f["sum"].copy(), f["second_moment"].copy()
        return sk
