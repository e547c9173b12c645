"""MultiHeadSketch: one exact LevSketch per attention head, fed with (heads, m, d) blocks in one call.

Why a list of per-head sketches rather than one stacked state: the per-head
work is BLAS-3 (Gram update, triangular solves) that numpy's batched routines
run head by head anyway, and each head's factor needs its own update path
(Gram/Cholesky, CholeskyQR2 or Householder) by its own condition number; see
``benchmarks/bench_multihead.py`` for the measured cost of the loop against a
vectorized lower bound.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import _format
from ._constants import DEFAULT_RTOL
from ._decode import apply_plan, plan_one
from ._sketch_base import KeySketch, locked, size_bound, transaction
from ._topk import top_k
from ._validation import as_real_array, check_budget, check_dim, check_eps, check_head, check_ids
from .sketch import LevSketch

__all__ = ["MultiHeadSketch"]


@size_bound
def per_head_max_retained(cls, d: int, eps) -> np.ndarray:
    """A-priori bound per head (key stream), ``floor(d / eps[h])``, shape (heads,).

    The ``max_retained`` of :class:`MultiHeadSketch` and :class:`~streamlev.DecodeEngine`:
    ``Cls.max_retained(d, eps)`` before any data, ``sk.max_retained()`` on a sketch
    (the old property spelling ``mh.max_retained`` still works as an array, with a
    DeprecationWarning).

    Parameters
    ----------
    d : int
        Key dimension.
    eps : array_like of shape (heads,)
        Per-head thresholds.

    Returns
    -------
    ndarray of shape (heads,), int64
    """
    return np.array([LevSketch.max_retained(d, float(e)) for e in np.atleast_1d(eps)], dtype=np.int64)


class MultiHeadSketch(KeySketch):
    """Universal sets of keys for several attention heads at once (x^2 attention, p = 2).

    Parameters
    ----------
    heads : int
        Number of heads (or (layer, head) pairs, flattened).
    d : int
        Key dimension of every head.
    eps : float or array_like of shape (heads,)
        Threshold of each head, in (0, 1].
    rtol : float, default=1e-13
        Relative ridge of the leverage definition (see :mod:`streamlev.reference`).

    Notes
    -----
    Guarantee (per head, the same as :class:`~streamlev.LevSketch`): after
    any sequence of ``update`` and ``merge`` calls, ``universal_set(h, e)``
    equals the exact offline ``{j : tau_j(K_h) >= e}`` for every
    ``e >= eps[h]``, where K_h are the keys of head h; ``num_retained[h] <=
    floor(d / eps[h])`` whatever n is. Every head is a LevSketch and gives
    bit-identical results to one fed with that head's keys alone.

    Inputs: numpy arrays of float16/32/64 (or integers) and CPU torch tensors
    (bfloat16 is converted to float32) are accepted as they are. Results
    (ids, scores, keys) are numpy; :func:`streamlev.attention.lev_attention`
    returns torch for torch input.

    Errors: on any error ``update`` and ``merge`` leave every head unchanged.
    Every public method holds an internal lock.
    """

    def __init__(self, heads: int, d: int, eps, *, rtol: float = DEFAULT_RTOL):
        super().__init__()
        caller = "MultiHeadSketch"
        self._heads = check_dim(heads, name="heads", caller=caller)
        self._d = check_dim(d, caller=caller)
        self._eps = _check_per_head(eps, self._heads, "eps", caller)
        self._sk = [LevSketch(self._d, float(e), rtol=rtol) for e in self._eps]
        self._rtol = self._sk[0].rtol

    # ------------------------------------------------------------ properties
    _p = 2.0
    heads = property(lambda self: self._heads, doc="Number of heads.")
    eps = property(lambda self: self._eps.copy(), doc="Per-head thresholds, shape (heads,) (a copy).")

    @property
    def n(self) -> np.ndarray:
        """Keys seen per head, shape (heads,), int64."""
        return np.array([s.n for s in self._sk], dtype=np.int64)

    @property
    def num_retained(self) -> np.ndarray:
        """Keys held per head, shape (heads,), int64 (each <= ``max_retained``)."""
        with self._lock:
            return np.array([s.num_retained for s in self._sk], dtype=np.int64)

    max_retained = per_head_max_retained

    def _size_params(self):
        return self._d, self._eps

    @property
    def nbytes(self) -> int:
        """Bytes held by all heads' arrays."""
        return int(sum(s.nbytes for s in self._sk))

    def _snapshot(self):
        return [s._snapshot() for s in self._sk]

    def _restore(self, snaps):
        for sk, snap in zip(self._sk, snaps):
            sk._restore(snap)

    def __repr__(self) -> str:
        return (f"MultiHeadSketch(heads={self._heads}, d={self._d}, eps={self._eps.tolist()!r}; "
                f"n={self.n.tolist()}, num_retained={self.num_retained.tolist()})")

    def sketch(self, head: int) -> LevSketch:
        """An independent copy of one head's LevSketch.

        Parameters
        ----------
        head : int
            Head index in [0, heads).

        Returns
        -------
        LevSketch
        """
        return self._sk[self._head(head, "MultiHeadSketch.sketch")].copy()

    def _head(self, head, caller):
        return check_head(head, self._heads, caller=caller)

    # ---------------------------------------------------------------- update
    def update(self, keys, ids=None, values=None, *, return_changes: bool = False):
        """Fold one block of keys per head into the sketch.

        Parameters
        ----------
        keys : array_like of shape (heads, m, d), or (heads, d) for one key per head
            numpy (float16/32/64, ints) or CPU torch tensor (bfloat16 included).
        ids : array_like of int, shape (m,) (shared by all heads) or (heads, m), optional
            Default: ``n[h], ..., n[h] + m - 1`` per head.
        values : array_like of shape (heads, m, dv), optional
            Payload per key (e.g. value vectors), as in :meth:`LevSketch.update`.
        return_changes : bool, default=False
            Return a list of :class:`~streamlev.Changes`, one per head, instead of self.

        Notes
        -----
        Input is validated for every head before any head changes; if a head
        still fails (e.g. an id already retained), all heads are restored.

        Returns
        -------
        MultiHeadSketch or list of Changes
            self, or one :class:`~streamlev.Changes` per head with ``return_changes``.
        """
        caller = "MultiHeadSketch.update"
        with self._lock:
            K = as_real_array(keys, name="keys", caller=caller, ndim=(2, 3))
            if K.ndim == 2:
                K = K[:, None, :]
            if K.shape[0] != self._heads or K.shape[2] != self._d:
                raise ValueError(f"{caller}: keys must have shape (heads, m, d) = ({self._heads}, m, {self._d}) "
                                 f"or (heads, d); got {np.shape(keys)}.")
            m = K.shape[1]
            id_rows = self._check_ids(ids, m, caller)
            V = None
            if values is not None:
                V = as_real_array(values, name="values", caller=caller, ndim=(2, 3))
                if V.ndim == 2:
                    V = V[:, None, :] if m == 1 and _keys_ndim(keys) == 2 else V[:, :, None]
                if V.shape[:2] != (self._heads, m):
                    raise ValueError(f"{caller}: values must have shape (heads, m, dv) = ({self._heads}, {m}, dv); "
                                     f"got {np.shape(values)}.")
            if m == 1:
                fast = self._decode_all(K, id_rows, V, return_changes)
                if fast is not None:
                    return fast
            out = []
            with transaction(*self._sk):
                for h, sk in enumerate(self._sk):
                    out.append(sk.update(K[h], ids=None if id_rows is None else id_rows[h],
                                         values=None if V is None else V[h], return_changes=return_changes))
            return out if return_changes else self

    def _decode_all(self, K, id_rows, V, return_changes):
        """One key per head through every head's rank-one fast path, or None (nothing changed).

        All heads are checked first (plans mutate nothing), so no snapshot is needed: once
        every head has a plan, applying them cannot fail.
        """
        with locked(*self._sk):
            plans = []
            for h, sk in enumerate(self._sk):
                plan = plan_one(sk, K[h, 0], None if id_rows is None else int(id_rows[h][0]),
                                None if V is None else V[h, 0], check_range=True)
                if plan is None:
                    return None
                plans.append(plan)
            out = [apply_plan(sk, plan, return_changes) for sk, plan in zip(self._sk, plans)]
        return out if return_changes else self

    def _check_ids(self, ids, m, caller):
        if ids is None:
            return None
        arr = ids
        if hasattr(arr, "detach") and hasattr(arr, "cpu"):
            arr = arr.detach().cpu().numpy()
        arr = np.asarray(arr)
        if arr.ndim == 2:
            if arr.shape[0] != self._heads:
                raise ValueError(f"{caller}: ids of shape (heads, m) must have {self._heads} rows; got {arr.shape}.")
            return [check_ids(arr[h], m, caller=caller) for h in range(self._heads)]
        row = check_ids(arr, m, caller=caller)
        return [row] * self._heads

    # ------------------------------------------------------------------ merge
    def merge(self, other: MultiHeadSketch, *, return_changes: bool = False):
        """Fold another MultiHeadSketch (same heads, d, eps, rtol; disjoint ids per head) into this one.

        Parameters
        ----------
        other : MultiHeadSketch
            Not modified.
        return_changes : bool, default=False
            Return one :class:`~streamlev.Changes` per head instead of self.

        Returns
        -------
        MultiHeadSketch or list of Changes

        Notes
        -----
        The result is exactly the sketch of the union of both key sets, per
        head. On error no head changes.
        """
        caller = "MultiHeadSketch.merge"
        self._check_other(other, caller)
        with locked(self, other):
            mine = (self._heads, self._d, self._eps.tolist(), self._rtol)
            theirs = (other._heads, other._d, other._eps.tolist(), other._rtol)
            if mine != theirs:
                raise ValueError(f"{caller}: incompatible sketches: (heads, d, eps, rtol)={mine} here and "
                                 f"{theirs} in the other. Only sketches built with the same parameters merge.")
            out = []
            with transaction(*self._sk):
                for a, b in zip(self._sk, other._sk):
                    out.append(a.merge(b, return_changes=return_changes))
            return out if return_changes else self

    # ---------------------------------------------------------------- queries
    def _per_head(self, head, fn, caller):
        with self._lock:
            if head is None:
                return [fn(s) for s in self._sk]
            return fn(self._sk[self._head(head, caller)])

    def universal_set(self, eps=None, *args, head: int | None = None):
        """Sorted int64 ids with leverage >= eps, for one head or (head=None) a list over heads.

        Parameters
        ----------
        eps : float or array_like of shape (heads,), optional
            Default each head's eps; a scalar or one value per head, each >= that head's eps.
        *args
            Deprecated: the old second positional argument (eps after head).
        head : int, optional (keyword)
            One head; default all heads.

        Returns
        -------
        ids : ndarray of int64 (one head) or list of ``heads`` such arrays

        Notes
        -----
        The old spelling ``universal_set(head, eps)`` (head first, positional) still
        works with a DeprecationWarning when the first argument is an int.
        """
        caller = "MultiHeadSketch.universal_set"
        if args or (isinstance(eps, (int, np.integer)) and not isinstance(eps, (bool, np.bool_))):
            warnings.warn("MultiHeadSketch.universal_set(head, eps) is deprecated; use universal_set(eps, head=h).",
                          DeprecationWarning, stacklevel=2)
            head, eps = eps, (args[0] if args else None)
        if eps is None:
            return self._per_head(head, lambda s: s.universal_set(), caller)
        if head is not None:
            return self._sk[self._head(head, caller)].universal_set(eps)
        e = _check_per_head(eps, self._heads, "eps", caller)
        with self._lock:
            return [s.universal_set(float(x)) for s, x in zip(self._sk, e)]

    def scores(self, head: int | None = None):
        """(ids, leverage) of the retained keys, per head (see :meth:`LevSketch.scores`).

        Parameters
        ----------
        head : int, optional
            One head; default every head.

        Returns
        -------
        tuple or list of tuples
            ``(ids, tau)`` for one head, or one such pair per head.
        """
        return self._per_head(head, lambda s: s.scores(), "MultiHeadSketch.scores")

    def retained(self, head: int | None = None):
        """(ids, keys, values) of the retained keys, per head (see :meth:`LevSketch.retained`).

        Parameters
        ----------
        head : int, optional
            Index of the head to read, in [0, heads); None (default) reads all of them.

        Returns
        -------
        rows : tuple ``(ids, keys, values)``, or a list of ``heads`` such tuples when ``head`` is None
        """
        return self._per_head(head, lambda s: s.retained(), "MultiHeadSketch.retained")

    def top(self, budget, *, head: int | None = None):
        """Ids of the ``budget`` retained keys of largest leverage (ties toward smaller ids), sorted.

        Parameters
        ----------
        budget : int or array_like of int of shape (heads,)
            Ids wanted per head, >= 0.
        head : int, optional (keyword)
            Rank the keys of this head only (default: every head).

        Returns
        -------
        ids : ndarray of shape (<= budget,), int64, or a list with one per head

        Notes
        -----
        A selection query: the sketch is not changed. Only keys with leverage
        >= eps[h] are retained, so a head returns fewer than ``budget`` ids when
        it holds fewer; build the sketch with eps <= (smallest leverage you need)
        to rank deeper.
        """
        caller = "MultiHeadSketch.top"
        if np.ndim(budget) == 0:
            b = np.full(self._heads, check_budget(budget, caller=caller, minimum=0))
        else:
            b = np.asarray(budget)
            if b.shape != (self._heads,) or b.dtype.kind not in "iu" or (b < 0).any():
                raise ValueError(f"{caller}: budget must be a non-negative int or {self._heads} of them; "
                                 f"got {budget!r}.")

        def pick(sk, k):
            ids, tau = sk.scores()
            return np.sort(ids[top_k(tau, int(k))])

        with self._lock:
            if head is not None:
                h = self._head(head, caller)
                return pick(self._sk[h], b[h])
            return [pick(s, k) for s, k in zip(self._sk, b)]

    def top_keys(self, budget, head: int | None = None):
        """Deprecated alias of :meth:`top` (``head`` is keyword-only there).

        Parameters
        ----------
        budget : int or array_like of int of shape (heads,)
            Ids wanted per head.
        head : int, optional
            One head.

        Returns
        -------
        ndarray or list of ndarray
            As :meth:`top`.
        """
        warnings.warn("MultiHeadSketch.top_keys is deprecated; use top(budget, head=h).", DeprecationWarning,
                      stacklevel=2)
        return self.top(budget, head=head)

    def heavy_attention(self, Q, eps=None):
        """Heavy x^2 attention entries per head (see :func:`streamlev.attention.heavy_attention`).

        Parameters
        ----------
        Q : array_like of shape (heads, n_q, d)
            Queries of every head.
        eps : float or array_like of shape (heads,), optional
            Entry threshold per head, each >= that head's eps (default: the heads' eps).

        Returns
        -------
        list of scipy.sparse.csr_matrix
            One per head, holding exactly the entries >= eps.
        """
        caller = "MultiHeadSketch.heavy_attention"
        Qa = as_real_array(Q, name="Q", caller=caller, ndim=(3,))
        if Qa.shape[0] != self._heads or Qa.shape[2] != self._d:
            raise ValueError(f"{caller}: Q must have shape (heads, n_q, d) = ({self._heads}, n_q, {self._d}); "
                             f"got {Qa.shape}.")
        e = [None] * self._heads if eps is None else _check_per_head(eps, self._heads, "eps", caller)
        with self._lock:
            return [s.heavy_attention(Qa[h], None if e[h] is None else float(e[h])) for h, s in enumerate(self._sk)]

    # ---------------------------------------------------------- serialization
    def _to_bytes(self) -> bytes:
        """Write this class's fields (see :meth:`Sketch.to_bytes`)."""
        with self._lock:
            parts = [s.to_bytes() for s in self._sk]
        blob = b"".join(parts)
        blob += b"\0" * (-len(blob) % 8)  # the container stores int64 words
        return _format.dump("MultiHeadSketch", {
            "heads": np.int64(self._heads), "d": np.int64(self._d), "rtol": np.float64(self._rtol),
            "eps": self._eps, "lengths": np.array([len(p) for p in parts], dtype=np.int64),
            "blob": np.frombuffer(blob, dtype="<i8"),
        })

    @classmethod
    def _from_bytes(cls, data) -> MultiHeadSketch:
        """Parse and check MultiHeadSketch bytes (see :meth:`Sketch.from_bytes`)."""
        caller = "MultiHeadSketch.from_bytes"
        f = _format.load(data, "MultiHeadSketch", {
            "heads": ((), "i8"), "d": ((), "i8"), "rtol": ((), "f8"), "eps": (("heads",), "f8"),
            "lengths": (("heads",), "i8"), "blob": (("w",), "i8"),
        })
        lengths = f["lengths"]
        blob = f["blob"].astype("<i8").tobytes()
        total = int(lengths.sum()) if lengths.size else 0
        if (lengths < 0).any() or total > len(blob) or len(blob) != total + (-total % 8):
            raise ValueError(f"{caller}: inconsistent per-head lengths (sum {total}) for {len(blob)} payload bytes.")
        try:
            out = cls(int(f["heads"]), int(f["d"]), f["eps"], rtol=float(f["rtol"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{caller}: invalid parameters in the header: {exc}") from None
        pos = 0
        for h, k in enumerate(lengths.tolist()):
            try:
                sk = LevSketch.from_bytes(blob[pos : pos + k])
            except ValueError as exc:
                raise ValueError(f"{caller}: head {h}: {exc}") from None
            pos += k
            if (sk.d, sk.eps, sk.rtol) != (out._d, float(out._eps[h]), out._rtol):
                raise ValueError(f"{caller}: head {h} holds (d, eps, rtol)={(sk.d, sk.eps, sk.rtol)}, but the "
                                 f"header says {(out._d, float(out._eps[h]), out._rtol)}.")
            out._sk[h] = sk
        return out


def _keys_ndim(keys) -> int:
    """ndim of an array or torch tensor without converting it."""
    return len(np.shape(keys)) if not hasattr(keys, "dim") else int(keys.dim())


def _check_per_head(x, heads, name, caller):
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if arr.ndim == 0:
        arr = np.full(heads, arr)
    if arr.shape != (heads,):
        raise ValueError(f"{caller}: {name} must be a scalar or have shape ({heads},) (one per head); "
                         f"got shape {arr.shape}.")
    return np.array([check_eps(v.item() if hasattr(v, "item") else v, name=name, caller=caller) for v in arr])

