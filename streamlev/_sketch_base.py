"""The one contract every stateful streamlev sketch follows, and the machinery that implements it.

A sketch class subclasses :class:`Sketch` and provides

* ``update(...)``, ``merge(other)``, ``to_bytes()``, ``from_bytes(data)`` (classmethod),
  properties ``n``, ``d``, ``nbytes``;
* ``_snapshot()`` / ``_restore(snap)``: a copy of the whole mutable state and its
  restoration (what :func:`transactional` uses to make a failed call a no-op);
* for key-selecting sketches (``scores()`` defined): ``universal_set(eps=None)``,
  a :class:`size_bound` ``max_retained`` and ``num_retained``.

and gets from the base: one re-entrant lock per sketch (``self._lock``, created by
``Sketch.__init__``), ``copy`` / ``copy.copy`` / ``copy.deepcopy`` / pickle through the
byte format (so locks never need pickling and pickles carry the checked format),
``==`` (equal bytes), ``is_empty``, ``top(budget)`` and :func:`transactional`.

Thread-safety rule: every public method that reads or changes state holds
``self._lock``; methods touching two sketches take both locks in ``id`` order
(:func:`locked`), so concurrent calls are serialized and never deadlock.
"""

from __future__ import annotations

import abc
import functools
import inspect
import threading
import warnings
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import numpy as np

from ._topk import top_k
from ._validation import check_budget, check_eps

__all__ = ["Sketch", "KeySketch", "Changes", "transactional", "locked", "transaction", "size_bound"]


class Changes(NamedTuple):
    """Ids that entered and left the retained set during one ``update`` or ``merge``.

    ``added`` are ids of the new keys that are retained after the call;
    ``evicted`` are ids that were retained before the call and are not after it.
    """

    added: np.ndarray
    evicted: np.ndarray


def no_changes() -> Changes:
    """The Changes of a call that changed nothing."""
    return Changes(np.zeros(0, np.int64), np.zeros(0, np.int64))


def changes_between(before: np.ndarray, now: np.ndarray, new_ids: np.ndarray) -> Changes:
    """Changes from the retained ids before and after a call that brought ``new_ids``."""
    added = np.sort(new_ids[np.isin(new_ids, now)])
    evicted = np.sort(before[~np.isin(before, now)])
    return Changes(added, evicted)


def _rebuild(cls, data):
    return cls.from_bytes(data)


class Sketch(abc.ABC):
    """Base of every stateful, mergeable streamlev sketch (see the module docstring for the contract)."""

    def __init__(self):
        self._lock = threading.RLock()

    # ------------------------------------------------------- copies and pickle
    def copy(self):
        """An independent copy (through the byte format).

        Returns
        -------
        sketch : same class, ``== self``, sharing no state with it
        """
        return type(self).from_bytes(self.to_bytes())

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_rebuild, (type(self), self.to_bytes()))

    def __eq__(self, other):
        """Two sketches are equal when they serialize to the same bytes (same class, parameters and state)."""
        if type(other) is not type(self):
            return NotImplemented
        return other is self or self.to_bytes() == other.to_bytes()

    __hash__ = None  # mutable

    def _check_other(self, other, caller: str) -> None:
        """The first checks of every ``merge``: same class, and not the sketch itself."""
        cls = type(self).__name__
        if type(other) is not type(self):
            raise TypeError(f"{caller}: can only merge another {cls}, got {type(other).__name__}.")
        if other is self:
            raise ValueError(f"{caller}: cannot merge a {cls} with itself (its ids or vectors would count twice).")

    # ------------------------------------------------------------------ state
    d = property(lambda self: self._d, doc="Dimension of the vectors (keys or queries) the sketch takes.")
    n = property(lambda self: self._n, doc="Number of vectors seen (including merged sketches).")

    # ------------------------------------------------------- what a sketch implements
    @abc.abstractmethod
    def update(self, *args, **kwargs):
        """Fold a block of vectors in; returns self (or the changes, where a sketch reports them)."""

    @abc.abstractmethod
    def merge(self, other):
        """Fold another sketch of the same kind and parameters in; ``other`` is not modified."""

    def to_bytes(self) -> bytes:
        """Serialize to versioned, self-describing, CRC32-checked bytes (no pickle).

        Returns
        -------
        bytes
            Read back with :meth:`from_bytes`; the format is :mod:`streamlev._format`.

        Notes
        -----
        Equal sketches give equal bytes (retained rows are written sorted by id),
        so ``==`` compares bytes. Parameters and seeds travel with the data.
        """
        return self._to_bytes()

    def _to_bytes(self) -> bytes:
        """Write the fields of this class under its kind (implement this, or override :meth:`to_bytes`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _to_bytes (or override to_bytes).")

    @classmethod
    def from_bytes(cls, data):
        """Rebuild a sketch from :meth:`to_bytes` output; raise ValueError on anything else.

        Parameters
        ----------
        data : bytes, bytearray or memoryview
            Output of :meth:`to_bytes` of this class (format version 1).

        Returns
        -------
        sketch : instance of the class it is called on

        Notes
        -----
        Magic, version, kind, CRC32, dtypes, shapes and the sketch's invariants are
        checked before anything is allocated or used; pickles go through here too.
        """
        return cls._from_bytes(data)

    @classmethod
    def _from_bytes(cls, data):
        """Parse and check the bytes of this class (implement this, or override :meth:`from_bytes`)."""
        raise NotImplementedError(f"{cls.__name__} must implement _from_bytes (or override from_bytes).")

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held by the sketch's arrays."""

    @abc.abstractmethod
    def _snapshot(self):
        """A copy of the whole mutable state (what :func:`transactional` restores on error)."""

    @abc.abstractmethod
    def _restore(self, snap):
        """Put back a state returned by :meth:`_snapshot`."""

    @property
    def is_empty(self) -> bool:
        """True when no key (or query) has been seen."""
        return not np.any(self.n)



class KeySketch(Sketch):
    """A sketch that keeps a set of keys scored against everything seen: the selection contract.

    Subclasses provide ``scores()`` (sorted ids and their scores, each >= eps),
    ``_eps``, ``_p``, ``_rtol``, ``_rows`` (or override the members below) and a
    :class:`size_bound` ``max_retained``. ``_SCORE`` names the score in messages.
    """

    _SCORE = "scores"

    eps = property(lambda self: self._eps, doc="Threshold the sketch was built for: every key scoring >= eps is kept.")
    p = property(lambda self: self._p, doc="Attention exponent, f(x) = |x|^p.")
    rtol = property(lambda self: self._rtol, doc="Relative ridge of the numerical leverage definition.")
    num_retained = property(lambda self: self._rows.r, doc="Number of keys held (always <= ``max_retained()``).")

    def scores(self):
        """Ids of the retained keys and their scores (leverage, or certified upper bounds for LpSketch).

        Returns
        -------
        ids : ndarray of shape (r,), int64, sorted
        score : ndarray of shape (r,), float64, each >= eps
        """
        with self._lock:
            self._refresh()
            ids, _, score, _ = self._rows.sorted()
            return ids, score

    def _retained_rows(self):
        """(sorted ids, keys at the original scale, values or None) of the retained keys."""
        with self._lock:
            self._refresh()
            ids, K, _, V = self._rows.sorted()
            return ids, self._f.unscaled(K), V

    def _refresh(self):
        """Bring lazily maintained scores up to date (nothing to do unless a sketch defers work)."""

    def universal_set(self, eps: float | None = None) -> np.ndarray:
        """Sorted int64 ids of the retained keys scoring >= eps.

        Parameters
        ----------
        eps : float, optional
            Threshold, >= the sketch's eps (keys below it were discarded); default ``self.eps``.

        Returns
        -------
        ids : ndarray of shape (u,), int64, sorted
        """
        caller = f"{type(self).__name__}.universal_set"
        with self._lock:
            e = self._eps if eps is None else check_eps(eps, caller=caller)
            if e < self._eps:
                raise ValueError(f"{caller}: eps={e!r} is below the sketch's eps={self._eps!r}; keys with smaller "
                                 f"{self._SCORE} were not kept. Build the sketch with a smaller eps.")
            ids, score = self.scores()
            return ids[score >= e]

    def top(self, budget: int) -> np.ndarray:
        """Sorted ids of the ``budget`` retained keys of largest score (ties toward smaller ids).

        Parameters
        ----------
        budget : int
            Number of ids wanted, >= 0.

        Returns
        -------
        ids : ndarray of shape (min(budget, num_retained),), int64, sorted

        Notes
        -----
        A selection query: the sketch is not changed. Only keys scoring >= eps
        are retained, so fewer than ``budget`` ids come back when fewer are held.
        """
        b = check_budget(budget, caller=f"{type(self).__name__}.top", minimum=0)
        ids, score = self.scores()
        return np.sort(ids[top_k(score, b)])


def transactional(method):
    """Run a state-changing method under the sketch's lock; on any exception restore the state first."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            snap = self._snapshot()
            try:
                return method(self, *args, **kwargs)
            except BaseException:
                self._restore(snap)
                raise

    return wrapper


@contextmanager
def locked(*sketches):
    """Hold the locks of several sketches, taken in ``id`` order (no deadlock between opposite merges)."""
    with ExitStack() as stack:
        for sk in sorted({id(s): s for s in sketches}.values(), key=id):
            stack.enter_context(sk._lock)
        yield


@contextmanager
def transaction(*sketches):
    """All-or-nothing over several sketches: on an exception every one is restored to its state at entry."""
    with locked(*sketches):
        snaps = [sk._snapshot() for sk in sketches]
        try:
            yield
        except BaseException:
            for sk, snap in zip(sketches, snaps):
                sk._restore(snap)
            raise


class size_bound:
    """The ``max_retained`` member: an a-priori size bound usable on the class and on an instance.

    ``Cls.max_retained(*params)`` computes the bound from constructor parameters
    (``LevSketch.max_retained(16, 0.05)``, before any data); ``sk.max_retained()``
    gives the bound of that sketch; ``sk.max_retained(*params)`` still computes from
    the parameters. Decorate a function ``f(cls, *params)``; the instance case calls
    ``f(cls, *sk._size_params())``.
    """

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)
        sig = inspect.signature(fn)
        self._signature = sig.replace(parameters=list(sig.parameters.values())[1:])  # without cls

    def __get__(self, obj, cls):
        if obj is None:
            fn = self.fn

            def on_class(*args, **kwargs):
                return fn(cls, *args, **kwargs)

            functools.update_wrapper(on_class, fn)
            del on_class.__wrapped__  # so that inspect shows the signature below, without cls
            on_class.__signature__ = self._signature
            return on_class
        return _BoundSize(self.fn, cls, obj)


class _BoundSize:
    """``sk.max_retained``: call it (``sk.max_retained()``); using it as a value is the deprecated property spelling."""

    __slots__ = ("_fn", "_cls", "_obj")

    def __init__(self, fn, cls, obj):
        self._fn, self._cls, self._obj = fn, cls, obj

    def __call__(self, *args, **kwargs):
        if args or kwargs:
            return self._fn(self._cls, *args, **kwargs)
        return self._fn(self._cls, *self._obj._size_params())

    def _value(self):
        warnings.warn(f"{self._cls.__name__}.max_retained is a method: call max_retained() (using it as a "
                      "value is deprecated).", DeprecationWarning, stacklevel=3)
        return np.asarray(self())

    def __array__(self, dtype=None, copy=None):
        v = self._value()
        return v if dtype is None else v.astype(dtype)

    def __iter__(self):
        return iter(self._value())

    def __len__(self):
        return len(self._value())

    def __getitem__(self, i):
        return self._value()[i]

    def tolist(self):
        return self._value().tolist()

    def __eq__(self, other):
        return self._value() == other

    def __ne__(self, other):
        return self._value() != other

    def __lt__(self, other):
        return self._value() < other

    def __le__(self, other):
        return self._value() <= other

    def __gt__(self, other):
        return self._value() > other

    def __ge__(self, other):
        return self._value() >= other

    __hash__ = None

    def __repr__(self):
        return f"<bound max_retained of {self._obj!r}>"
