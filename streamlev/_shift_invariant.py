"""ShiftInvariantSketch: leverage of the keys augmented with a constant coordinate (a LevSketch of [k, c]).

Public as :class:`streamlev.ShiftInvariantSketch` and
``streamlev.selectors.ShiftInvariantSketch``; a sketch, so it lives in the
sketch layer (see docs/architecture.md).
"""

from __future__ import annotations

import numpy as np

from . import _format
from ._constants import DEFAULT_RTOL
from ._sketch_base import KeySketch, locked, size_bound
from ._validation import check_dim, check_eps, check_keys
from .sketch import LevSketch

__all__ = ["ShiftInvariantSketch"]


class ShiftInvariantSketch(KeySketch):
    """Leverage of the keys augmented with a constant coordinate, ``[k, c]``: one-pass, mergeable, exact.

    Softmax attention is unchanged when every key is shifted by the same vector
    (the shift adds ``<q, shift>`` to every logit of a query), so a softmax key
    score should be shift-invariant; plain leverage is not. The leverage of the
    augmented rows ``[k_j, c]`` is

        tau_j([K, c 1]) = 1/n + tau_j(K - 1 mu^T),   mu = mean key,

    (the column space of ``[K, c1]`` is ``span(1)`` plus the orthogonal span of
    the centred keys), which is shift-invariant up to the constant ``1/n``, and
    -- being ordinary leverage of a growing row set -- never increases as keys
    arrive. So the exact streaming, merge and threshold machinery of
    :class:`LevSketch` carries over: this class *is* a ``LevSketch(d + 1, eps)``
    fed with ``[k, c]``.

    Parameters
    ----------
    d : int
        Key dimension (the inner sketch has d + 1 columns).
    eps : float in (0, 1]
        Smallest augmented leverage kept.
    c : float, default=1.0
        The constant coordinate. Mathematically irrelevant: ``[K, c1]`` and
        ``[K, 1]`` have the same column space for every ``c != 0``, so the scores
        do not depend on ``c``. Numerically it matters only through conditioning:
        a ``c`` far from the typical key norm makes the (d+1)-column factor
        ill-conditioned (error ~ u * cond), so pick ``c`` of the order of the
        key norms (e.g. the RMS norm of the first block). It is fixed for the
        life of the sketch and must match to merge.
    rtol : float, default=1e-13
        Relative ridge of the leverage (see :mod:`streamlev.reference`).

    Notes
    -----
    Guarantee (exact, inherited from LevSketch): after any sequence of updates
    and merges over keys K, ``universal_set(e) == {j : 1/n + tau_j(K_c) >= e}``
    for all ``e >= eps``, ``num_retained <= (d + 1)/eps``. For the x^2 attention
    of *augmented* queries ``[q, b]`` (a query with a bias, i.e. logits
    ``<q, k> + b c``) it is the universal set. For softmax it is a heuristic
    ranking only: no share of softmax mass is guaranteed.
    """

    def __init__(self, d: int, eps: float, *, c: float = 1.0, rtol: float = DEFAULT_RTOL):
        super().__init__()
        self._d = check_dim(d, caller="ShiftInvariantSketch")
        check_eps(eps, caller="ShiftInvariantSketch")
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, float, np.integer, np.floating)) \
                or not np.isfinite(c) or float(c) == 0.0:
            raise ValueError(f"ShiftInvariantSketch: c must be a finite non-zero real number (about the typical "
                             f"key norm); got {c!r}.")
        self._c = float(c)
        self._sk = LevSketch(self._d + 1, eps, rtol=rtol)

    def _snapshot(self):
        return self._sk._snapshot()

    def _restore(self, snap):
        self._sk._restore(snap)

    def _augment(self, keys, caller):
        K = check_keys(keys, self._d, caller=caller, check_finite=False)
        return np.hstack([K.astype(np.float64, copy=False), np.full((K.shape[0], 1), self._c)])

    _p = 2.0  # x^2 attention of the augmented keys
    c = property(lambda self: self._c, doc="The constant coordinate.")
    # everything else is the inner LevSketch's (of dimension d + 1)
    eps = property(lambda self: self._sk.eps, doc="Threshold the sketch was built for.")
    rtol = property(lambda self: self._sk.rtol, doc="Relative ridge of the numerical leverage definition.")
    n = property(lambda self: self._sk.n, doc="Number of keys seen.")
    num_retained = property(lambda self: self._sk.num_retained, doc="Number of keys held (<= ``max_retained()``).")
    nbytes = property(lambda self: self._sk.nbytes, doc="Bytes held by the inner sketch's arrays.")

    @size_bound
    def max_retained(cls, d: int, eps: float) -> int:
        """A-priori bound on ``num_retained``: ``floor((d + 1) / eps)``.

        Parameters
        ----------
        d : int
            Key dimension (without the constant coordinate).
        eps : float in (0, 1]
            Threshold.

        Returns
        -------
        int
        """
        return LevSketch.max_retained(check_dim(d, caller="ShiftInvariantSketch.max_retained") + 1, eps)

    def _size_params(self):
        return self._d, self.eps

    def __repr__(self) -> str:
        return f"ShiftInvariantSketch(d={self._d}, eps={self.eps!r}, c={self._c!r}; n={self.n})"

    def update(self, keys, ids=None, values=None, *, return_changes: bool = False):
        """Fold keys in; the same contract as :meth:`LevSketch.update`.

        Parameters
        ----------
        keys : array_like of shape (m, d) or (d,)
            Keys without the constant coordinate.
        ids : array_like of int of shape (m,), optional
            Distinct ids; default ``n, ..., n+m-1``.
        values : array_like of shape (m, dv), optional
            Payload carried with each key.
        return_changes : bool, default=False
            Return a :class:`~streamlev.Changes` instead of self.

        Returns
        -------
        ShiftInvariantSketch or Changes
        """
        with self._lock:
            out = self._sk.update(self._augment(keys, "ShiftInvariantSketch.update"), ids=ids, values=values,
                                  return_changes=return_changes)
            return self if out is self._sk else out

    def merge(self, other: ShiftInvariantSketch, *, return_changes: bool = False):
        """Fold another sketch built on disjoint keys with the same ``c`` in; exact.

        Parameters
        ----------
        other : ShiftInvariantSketch
            Same d, eps, c and rtol; not modified.
        return_changes : bool, default=False
            Return a :class:`~streamlev.Changes` instead of self.

        Returns
        -------
        ShiftInvariantSketch or Changes
        """
        self._check_other(other, "ShiftInvariantSketch.merge")
        if other._c != self._c:
            raise ValueError(f"ShiftInvariantSketch.merge: constant coordinates differ (c={self._c!r} here, "
                             f"{other._c!r} in the other sketch); build both with the same c.")
        with locked(self, other):
            out = self._sk.merge(other._sk, return_changes=return_changes)
            return self if out is self._sk else out

    def scores(self):
        """Retained ids and their exact augmented leverage ``1/n + tau_j(K_c)``.

        Returns
        -------
        ids : ndarray of shape (r,), int64, sorted
        tau : ndarray of shape (r,), float64, each >= eps
        """
        return self._sk.scores()

    def universal_set(self, eps: float | None = None) -> np.ndarray:
        """Sorted ids with augmented leverage >= eps.

        Parameters
        ----------
        eps : float, optional
            Threshold, >= the sketch's eps; default ``self.eps``.

        Returns
        -------
        ndarray of shape (u,), int64
        """
        return self._sk.universal_set(eps)

    def retained(self):
        """Retained ids, keys (without the constant coordinate) and payload values.

        Returns
        -------
        ids : ndarray of shape (r,), int64, sorted
        keys : ndarray of shape (r, d), float64
        values : ndarray of shape (r, dv) or None
        """
        ids, K, V = self._sk.retained()
        return ids, K[:, : self._d], V

    def _to_bytes(self) -> bytes:
        """Write this class's fields (see :meth:`Sketch.to_bytes`)."""
        with self._lock:
            inner = self._sk.to_bytes()
            pad = (-len(inner)) % 8
            words = np.frombuffer(inner + b"\0" * pad, dtype="<i8")
            return _format.dump("ShiftInvariantSketch", {"c": np.float64(self._c), "inner_len": np.int64(len(inner)),
                                                         "inner": words})

    @classmethod
    def _from_bytes(cls, data) -> ShiftInvariantSketch:
        """Parse and check ShiftInvariantSketch bytes (see :meth:`Sketch.from_bytes`)."""
        f = _format.load(data, "ShiftInvariantSketch", {"c": ((), "f8"), "inner_len": ((), "i8"),
                                                         "inner": ((None,), "i8")})
        raw = f["inner"].astype("<i8").tobytes()
        m = int(f["inner_len"])
        if not 0 <= m <= len(raw) < m + 8:
            raise ValueError("ShiftInvariantSketch.from_bytes: inconsistent inner length.")
        inner = LevSketch.from_bytes(raw[:m])
        if inner.d < 2:
            raise ValueError("ShiftInvariantSketch.from_bytes: the inner sketch must have d + 1 >= 2 columns.")
        sk = cls(inner.d - 1, inner.eps, c=float(f["c"]), rtol=inner.rtol)
        sk._sk = inner
        return sk
