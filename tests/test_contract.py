"""One contract for every stateful sketch: every concrete subclass of streamlev._sketch_base.Sketch.

Classes are discovered (all streamlev modules are imported first), so a sketch class
added later is checked automatically; the generic example below builds it from its
constructor signature (``heads``, ``d``, ``eps``, ``p``). A class that needs other
constructor arguments gets an entry in EXAMPLES.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle
import pkgutil
import threading
import warnings

import numpy as np
import pytest

import streamlev
from streamlev._constants import CHUNK_ROWS
from streamlev._sketch_base import Sketch


def _all_sketch_classes():
    for info in pkgutil.walk_packages(streamlev.__path__, "streamlev."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency is missing: its classes cannot be checked here
            continue
    out, todo = set(), [Sketch]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if not inspect.isabstract(sub) and sub.__module__.startswith("streamlev."):
                out.add(sub)
    return sorted(out, key=lambda c: c.__name__)


CLASSES = _all_sketch_classes()
D, HEADS, EPS = 4, 2, 0.1
# constructor arguments by parameter name, for the generic example
ARGS = {"heads": HEADS, "d": D, "eps": EPS, "p": 1.0}
EXAMPLES = {  # class name -> dict of constructor kwargs, for classes the generic example cannot build
    "SoftmaxSelector": {"d": D, "budget": 7, "rule": "keydiff"},
}


def make(cls, **override):
    if cls.__name__ in EXAMPLES:
        return cls(**{**EXAMPLES[cls.__name__], **override})
    sig = inspect.signature(cls)
    kw = {}
    for name, prm in sig.parameters.items():
        if prm.default is inspect.Parameter.empty and prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY):
            assert name in ARGS, (f"{cls.__name__}({name}=...): the contract test cannot build this class; add "
                                  "an entry to EXAMPLES in tests/test_contract.py")
            kw[name] = ARGS[name]
    return cls(**{**kw, **override})


def as_list(x):
    """Per-head results are lists; single-head ones become a one-element list."""
    return x if isinstance(x, list) else [x]


def keys(sk, m, seed):
    rng = np.random.default_rng(seed)
    shape = (HEADS, m, D) if "heads" in inspect.signature(type(sk)).parameters else (m, D)
    K = rng.standard_normal(shape)
    K[..., : max(1, m // 5), :] *= 5.0  # a few heavy keys
    return K


def takes(method, name):
    return name in inspect.signature(method).parameters


def update(sk, K, first_id):
    if takes(sk.update, "ids"):
        m = K.shape[-2]
        return sk.update(K, ids=np.arange(first_id, first_id + m))
    return sk.update(K)


def filled(cls, seed=0, m=30, first_id=0):
    sk = make(cls)
    update(sk, keys(sk, m, seed), first_id)
    return sk


@pytest.fixture(params=CLASSES, ids=lambda c: c.__name__)
def cls(request):
    return request.param


def test_every_known_sketch_is_discovered():
    names = {c.__name__ for c in CLASSES}
    assert {"LevSketch", "LpSketch", "LpEmbedding", "MultiHeadSketch", "ShiftInvariantSketch",
            "QuerySketch"} <= names


def test_members_and_state(cls):
    sk = make(cls)
    assert sk.is_empty and np.all(np.asarray(sk.n) == 0) and sk.d == D
    assert isinstance(sk.nbytes, int) and sk.nbytes >= 0
    assert isinstance(sk._lock, type(threading.RLock()))
    assert update(sk, keys(sk, 30, 0), 0) is sk
    assert not sk.is_empty and np.all(np.asarray(sk.n) == 30)
    assert isinstance(sk.nbytes, int) and sk.nbytes > 0


def test_bytes_copy_deepcopy_pickle_and_equality(cls):
    sk = filled(cls)
    for other in (cls.from_bytes(sk.to_bytes()), sk.copy(), copy.copy(sk), copy.deepcopy(sk),
                  pickle.loads(pickle.dumps(sk))):
        assert type(other) is cls and other is not sk
        assert other == sk and not (other != sk)
        assert other.to_bytes() == sk.to_bytes()
    twin = sk.copy()
    update(twin, keys(sk, 5, 9), 1000)  # copies are independent
    assert twin != sk and sk == cls.from_bytes(sk.to_bytes())
    assert sk != make(cls) and sk.__eq__(object()) is NotImplemented
    with pytest.raises(TypeError):
        hash(sk)  # mutable, compared by value


def test_merge_adds_up_and_leaves_other_unchanged(cls):
    a, b = filled(cls, seed=1, m=20), filled(cls, seed=2, m=25, first_id=20)
    b_before = b.copy()
    assert a.merge(b) is a
    assert b == b_before
    assert np.all(np.asarray(a.n) == 45)
    with pytest.raises(ValueError):
        a.merge(a)
    with pytest.raises(TypeError):
        a.merge(object())


def test_bad_input_leaves_the_sketch_unchanged(cls):
    sk = filled(cls)
    before = sk.copy()
    K = keys(sk, 3, 5)
    nan = K.copy()
    nan[..., 1, 0] = np.nan
    for bad in (nan, K[..., :-1], np.full(K.shape, "a"), np.zeros((2, 3, 4, 5))):
        with pytest.raises((ValueError, TypeError)):
            update(sk, bad, 500)
        assert sk == before
    late = keys(sk, CHUNK_ROWS + 5, 6)
    late[..., -1, 0] = np.nan  # the first chunk folds in before the bad one is reached: must be undone
    with pytest.raises(ValueError):
        update(sk, late, 10_000)
    assert sk == before
    if takes(sk.update, "ids"):
        with pytest.raises(ValueError):  # ids already used
            update(sk, K, 0)
        assert sk == before
    other = make(cls)
    other_bad = make(cls, d=D + 1)
    update(other_bad, np.random.default_rng(0).standard_normal(
        (HEADS, 3, D + 1) if takes(cls, "heads") else (3, D + 1)), 900)
    with pytest.raises(ValueError):
        sk.merge(other_bad)
    assert sk == before
    assert other.is_empty


def test_selection_members_have_one_signature(cls):
    if not hasattr(cls, "scores"):
        pytest.skip(f"{cls.__name__} selects no keys")
    us, top = inspect.signature(cls.universal_set), inspect.signature(cls.top)
    first = [p for p in us.parameters.values() if p.name != "self"][0]
    assert first.name == "eps" and first.default is None
    assert [p for p in top.parameters.values() if p.name != "self"][0].name == "budget"
    for sig in (us, top):  # a per-head class takes head= as a keyword only
        if "head" in sig.parameters:
            assert sig.parameters["head"].kind is inspect.Parameter.KEYWORD_ONLY
    sk = filled(cls, m=60)
    before = sk.copy()
    for got, want in zip(as_list(sk.universal_set(EPS)), as_list(sk.universal_set()), strict=True):
        np.testing.assert_array_equal(got, want)
    for ids, (all_ids, score) in zip(as_list(sk.top(3)), as_list(sk.scores()), strict=True):
        assert ids.size == min(3, all_ids.size) and np.all(np.diff(ids) > 0) and np.isin(ids, all_ids).all()
        if all_ids.size > 3:
            assert score[np.isin(all_ids, ids)].min() >= score[~np.isin(all_ids, ids)].max()
    assert sk == before  # queries do not change the sketch
    with pytest.raises(ValueError):
        sk.top(-1)


def test_max_retained_is_the_same_kind_of_member(cls):
    if not hasattr(cls, "max_retained"):
        pytest.skip(f"{cls.__name__} keeps no key set")
    sk = filled(cls, m=60)
    params = sk._size_params()
    by_class = cls.max_retained(*params)
    np.testing.assert_array_equal(sk.max_retained(), by_class)
    np.testing.assert_array_equal(sk.max_retained(*params), by_class)
    assert np.all(np.asarray(sk.num_retained) <= sk.max_retained())


def test_concurrent_updates_are_serialized(cls):
    sk = make(cls)
    blocks = [keys(sk, 10, s) for s in range(6)]

    def work(i):
        update(sk, blocks[i], 100 * i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.all(np.asarray(sk.n) == 60)
    assert cls.from_bytes(sk.to_bytes()) == sk


def test_old_spellings_still_work_with_a_deprecation_warning():
    mh = filled(streamlev.MultiHeadSketch, m=40)
    with pytest.warns(DeprecationWarning, match="top_keys"):
        old = mh.top_keys(3, 1)
    np.testing.assert_array_equal(old, mh.top(3, head=1))
    with pytest.warns(DeprecationWarning, match=r"universal_set\(head, eps\)"):
        old = mh.universal_set(1)
    np.testing.assert_array_equal(old, mh.universal_set(head=1))
    with pytest.warns(DeprecationWarning, match=r"universal_set\(head, eps\)"):
        old = mh.universal_set(0, 0.2)
    np.testing.assert_array_equal(old, mh.universal_set(0.2, head=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [len(u) for u in mh.universal_set(0.1)] == [len(u) for u in mh.universal_set(eps=0.1)]
    with pytest.warns(DeprecationWarning, match="max_retained"):
        assert list(mh.max_retained) == list(mh.max_retained())
    assert streamlev.LevSketch.max_retained(16, 0.05) == 320
