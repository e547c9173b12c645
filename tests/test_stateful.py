"""Stateful property test: random interleavings of every LevSketch operation vs an exact model.

The model keeps *all* keys (with their ids) and recomputes the leverage scores
offline with the SVD reference after every step. Rules: updates of random
block sizes (empty, single 1-D keys, decode-sized, multi-chunk), merges with
sketches of other partitions, byte round trips, copies, rejected bad inputs
(which must leave ``to_bytes()`` bit-identical) and queries.

Profiles: the default is fast (CI, well under a minute). For a long run::

    STREAMLEV_STATEFUL_EXAMPLES=400 STREAMLEV_STATEFUL_STEPS=100 \
        python -m pytest -q -p no:cacheprovider tests/test_stateful.py -s

(or ``HYPOTHESIS_PROFILE=nightly``, which implies 300 examples of 100 steps).
The number of steps run is printed at the end when ``-s`` is given.
"""

from __future__ import annotations

import atexit
import copy
import os
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import streamlev as sl
from streamlev.testing import KINDS, make_keys

from ._compare import assert_matches_reference

_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "nightly" or "STREAMLEV_STATEFUL_EXAMPLES" in os.environ
_EXAMPLES = int(os.environ.get("STREAMLEV_STATEFUL_EXAMPLES", "300" if _LONG else "15"))
_STEPS = int(os.environ.get("STREAMLEV_STATEFUL_STEPS", "100" if _LONG else "25"))
_COUNT = {"steps": 0, "runs": 0, "rejected_range": 0, "bad_inputs": 0, "merges": 0, "updates": 0}


@atexit.register
def _report():  # pragma: no cover - informational
    if _COUNT["runs"]:
        print(f"\n[test_stateful] {_COUNT}")


EPS = [0.05, 0.1, 0.3, 0.5, 1.0]
# block sizes: empty, one row, the rank-one (decode) range <= 8, ordinary blocks, and rarely > CHUNK_ROWS
SIZES = st.one_of(st.integers(0, 9), st.integers(10, 80), st.sampled_from([0, 1, 300, 4100]))
SEED = st.integers(0, 2**32 - 1)
_RANGE_LIMIT = 2.0**900  # beyond this dynamic range the sketch may refuse a block (float64 limits)


def _magnitude(K):
    K = np.abs(K[np.any(K != 0, axis=1)]) if K.size else K
    if K.size == 0:
        return None
    return float(np.max(K)), float(np.min(np.max(K, axis=1)))


class LevSketchMachine(RuleBasedStateMachine):
    """One sketch under test against an exact model (all keys kept, ids = global position)."""

    @initialize(d=st.integers(1, 6), eps=st.sampled_from(EPS))
    def setup(self, d, eps):
        self.d, self.eps = d, eps
        self.sk = sl.LevSketch(d, eps)
        self.blocks = []  # accepted keys, in id order (ids are always 0..n-1 in arrival order)
        self.n = 0
        _COUNT["runs"] += 1

    # ------------------------------------------------------------ helpers
    def model(self):
        return np.vstack(self.blocks) if self.blocks else np.zeros((0, self.d))

    def _keys(self, kind, m, seed):
        return make_keys(kind, max(m, 1), self.d, seed)[:m]

    def _extreme_range(self, B):
        """True when B and the model together span more than float64 can hold in one factor."""
        a, b = _magnitude(self.model()), _magnitude(B)
        if a is None or b is None:
            return False
        hi, lo = max(a[0], b[0]), min(a[1], b[1])
        return hi / lo > _RANGE_LIMIT if lo > 0 else True

    def _accept_or_clean_refusal(self, action, B):
        """Run action(); a float64-range refusal is allowed only for extreme ranges and must change nothing."""
        before = self.sk.to_bytes()
        try:
            action()
        except ValueError as exc:
            if not (self._extreme_range(B) and "float64" in str(exc)):
                raise
            assert self.sk.to_bytes() == before
            _COUNT["rejected_range"] += 1
            return False
        return True

    # ------------------------------------------------------------ rules
    @rule(kind=st.sampled_from(KINDS), m=SIZES, seed=SEED, explicit_ids=st.booleans())
    def update_block(self, kind, m, seed, explicit_ids):
        B = self._keys(kind, m, seed)
        rows, ids = B, None
        if explicit_ids:  # the default ids, passed explicitly in a shuffled order (rows permuted alike)
            perm = np.random.default_rng(seed).permutation(m)
            rows, ids = B[perm], self.n + perm
        if self._accept_or_clean_refusal(lambda: self.sk.update(rows, ids=ids), B):
            self.blocks.append(B)
            self.n += m
        _COUNT["updates"] += 1

    @rule(kind=st.sampled_from(KINDS), m=st.integers(1, 40), seed=SEED)
    def update_single_keys(self, kind, m, seed):
        for row in self._keys(kind, m, seed):
            if self._accept_or_clean_refusal(lambda: self.sk.update(row), row[None]):  # 1-D input
                self.blocks.append(row[None])
                self.n += 1
        _COUNT["updates"] += 1

    @rule(kind=st.sampled_from(KINDS), sizes=st.lists(SIZES, max_size=3), seed=SEED,
          via_bytes=st.booleans(), return_changes=st.booleans())
    def merge_other_partition(self, kind, sizes, seed, via_bytes, return_changes):
        other = sl.LevSketch(self.d, self.eps)
        parts, start = [], self.n
        for i, m in enumerate(sizes):
            B = self._keys(kind, m, seed + i)
            try:
                other.update(B, ids=np.arange(start, start + m))
            except ValueError:
                continue  # the partition's own range refusal is tested by the update rules
            parts.append(B)
            start += m
        if via_bytes:
            other = sl.LevSketch.from_bytes(other.to_bytes())
        other_bytes = other.to_bytes()
        B = np.vstack(parts) if parts else np.zeros((0, self.d))
        before_ids = set(self.sk.scores()[0].tolist()) if return_changes else None
        out = {}
        ok = self._accept_or_clean_refusal(
            lambda: out.setdefault("r", self.sk.merge(other, return_changes=return_changes)), B)
        assert other.to_bytes() == other_bytes  # merge never modifies its argument
        if ok:
            self.blocks += parts
            self.n += B.shape[0]
            if return_changes:
                now = set(self.sk.scores()[0].tolist())
                assert set(out["r"].added.tolist()) == now - before_ids
                assert set(out["r"].evicted.tolist()) == before_ids - now
        _COUNT["merges"] += 1

    @rule()
    def bytes_round_trip(self):
        b = self.sk.to_bytes()
        sk2 = sl.LevSketch.from_bytes(b)
        assert sk2.to_bytes() == b
        assert (sk2.n, sk2.d, sk2.eps, sk2.p, sk2.rtol) == (self.sk.n, self.d, self.eps, 2.0, self.sk.rtol)
        self.sk = sk2

    @rule(how=st.sampled_from(["copy", "deepcopy", "pickle", "method"]), seed=SEED)
    def copy_and_continue_with_the_copy(self, how, seed):
        b = self.sk.to_bytes()
        new = {"copy": copy.copy, "deepcopy": copy.deepcopy, "method": lambda s: s.copy(),
               "pickle": lambda s: pickle.loads(pickle.dumps(s))}[how](self.sk)
        assert new is not self.sk and new.to_bytes() == b
        try:  # the copies are independent: mutating the old one leaves the new one alone
            self.sk.update(make_keys("gaussian", 5, self.d, seed), ids=np.arange(10**12, 10**12 + 5))
        except ValueError:
            pass  # e.g. range refusal after huge keys; independence is still checked below
        assert new.to_bytes() == b
        self.sk = new

    @rule(bad=st.sampled_from(["nan", "inf", "columns", "3d", "repeat_ids", "retained_id", "string",
                               "complex", "bool", "id_count", "float_ids", "merge_eps", "merge_d",
                               "merge_rtol", "merge_self", "merge_clash", "merge_type", "values",
                               "query_eps", "corrupt_bytes", "truncated_bytes", "other_kind_bytes"]),
          seed=SEED)
    def rejected_bad_input(self, bad, seed):
        d, sk = self.d, self.sk
        rng = np.random.default_rng(seed)
        B = rng.standard_normal((4, d))
        if bad == "retained_id" or bad == "merge_clash":
            retained = sk.scores()[0]
            assume(retained.size > 0)
            rid = int(retained[rng.integers(retained.size)])
        before = sk.to_bytes()
        if bad == "nan":
            B[rng.integers(4), rng.integers(d)] = np.nan
            call = lambda: sk.update(B)  # noqa: E731
        elif bad == "inf":
            B[0, rng.integers(d)] = -np.inf
            call = lambda: sk.update(B[0])  # noqa: E731
        elif bad == "columns":
            call = lambda: sk.update(rng.standard_normal((3, d + 1)))  # noqa: E731
        elif bad == "3d":
            call = lambda: sk.update(B[None])  # noqa: E731
        elif bad == "repeat_ids":
            call = lambda: sk.update(B, ids=[10**13, 10**13 + 1, 10**13, 10**13 + 2])  # noqa: E731
        elif bad == "retained_id":
            call = lambda: sk.update(B[:2], ids=[10**13, rid])  # noqa: E731
        elif bad == "string":
            call = lambda: sk.update(np.array([["a"] * d]))  # noqa: E731
        elif bad == "complex":
            call = lambda: sk.update(B.astype(complex))  # noqa: E731
        elif bad == "bool":
            call = lambda: sk.update(B > 0)  # noqa: E731
        elif bad == "id_count":
            call = lambda: sk.update(B, ids=[1, 2])  # noqa: E731
        elif bad == "float_ids":
            call = lambda: sk.update(B, ids=[0.5, 1.5, 2.5, 3.5])  # noqa: E731
        elif bad == "merge_eps":
            other = sl.LevSketch(d, 0.07 if self.eps != 0.07 else 0.08).update(B, ids=np.arange(4) + 10**13)
            call = lambda: sk.merge(other)  # noqa: E731
        elif bad == "merge_d":
            other = sl.LevSketch(d + 1, self.eps).update(rng.standard_normal((4, d + 1)))
            call = lambda: sk.merge(other)  # noqa: E731
        elif bad == "merge_rtol":
            other = sl.LevSketch(d, self.eps, rtol=1e-10).update(B, ids=np.arange(4) + 10**13)
            call = lambda: sk.merge(other)  # noqa: E731
        elif bad == "merge_self":
            call = lambda: sk.merge(sk)  # noqa: E731
        elif bad == "merge_clash":
            other = sl.LevSketch(d, self.eps).update(np.eye(d)[:1] * 1e3, ids=[rid])
            call = lambda: sk.merge(other)  # noqa: E731
        elif bad == "merge_type":
            call = lambda: sk.merge(B)  # noqa: E731
        elif bad == "values":
            call = lambda: sk.update(B, values=np.ones((4, 2)))  # noqa: E731
            assume(sk.n > 0)  # values on a fresh sketch are legal
        elif bad == "query_eps":
            call = lambda: sk.universal_set(self.eps / 2)  # noqa: E731
        elif bad == "corrupt_bytes":
            b = bytearray(before)
            b[rng.integers(len(b))] ^= 1 << int(rng.integers(8))
            call = lambda: sl.LevSketch.from_bytes(bytes(b))  # noqa: E731
        elif bad == "truncated_bytes":
            call = lambda: sl.LevSketch.from_bytes(before[: rng.integers(len(before))])  # noqa: E731
        else:  # other_kind_bytes: a valid container that is not a LevSketch
            from streamlev import _format

            call = lambda: sl.LevSketch.from_bytes(_format.dump("LpSketch", {"d": np.int64(d)}))  # noqa: E731
        with pytest.raises((ValueError, TypeError)):
            call()
        assert sk.to_bytes() == before, bad  # rejected calls leave the sketch bit-identical
        _COUNT["bad_inputs"] += 1

    @rule(es=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4))
    def query(self, es):
        K = self.model()
        e_list = [self.eps + (1.0 - self.eps) * t for t in es]
        assert_matches_reference(self.sk, K, eps_list=e_list)
        ids, tau = self.sk.scores()
        _, keys, vals = self.sk.retained()
        np.testing.assert_array_equal(keys, K[ids]) if ids.size else None
        assert vals is None
        assert np.array_equal(self.sk.universal_set(), ids[tau >= self.eps])

    # ------------------------------------------------------------ invariant
    @invariant()
    def matches_exact_model(self):
        _COUNT["steps"] += 1
        # Queries refresh lazy state; check on a snapshot so the next rule sees the un-refreshed sketch.
        snap = self.sk._snapshot()
        try:
            assert self.sk.n == self.n
            assert self.sk.num_retained <= sl.LevSketch.max_retained(self.d, self.eps)
            assert_matches_reference(self.sk, self.model(), eps_list=[self.eps, min(1.0, 2 * self.eps)])
            assert np.isfinite(self.sk.scores()[1]).all()
        finally:
            self.sk._restore(snap)


LevSketchMachine.TestCase.settings = settings(
    max_examples=_EXAMPLES, stateful_step_count=_STEPS, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
TestLevSketchStateful = LevSketchMachine.TestCase


# ------------------------------------------------------------ p = 1 (LpSketch: no false negatives, superset)
class LpSketchMachine(RuleBasedStateMachine):
    """LpSketch(p=1) vs the exact sensitivity oracle on small K: the exact set is inside the sketch's set.

    Its guarantee is one-sided (the set may contain extra keys), so the check is
    exact-set <= sketch-set (away from near-ties) plus n and the size bound.
    """

    @initialize(d=st.integers(1, 4), eps=st.sampled_from([0.1, 0.3, 0.6]))
    def setup(self, d, eps):
        from streamlev.lp import LpSketch

        self.cls, self.d, self.eps = LpSketch, d, eps
        self.sk = LpSketch(d, eps, p=1.0)
        self.blocks, self.n = [], 0
        _COUNT["runs"] += 1

    def model(self):
        return np.vstack(self.blocks) if self.blocks else np.zeros((0, self.d))

    @precondition(lambda self: self.n < 40)  # the oracle solves one LP per key
    @rule(kind=st.sampled_from(["gaussian", "heavy_tailed", "low_rank", "duplicates", "zero_rows", "spikes"]),
          m=st.integers(0, 10), seed=SEED, single=st.booleans())
    def update(self, kind, m, seed, single):
        B = make_keys(kind, max(m, 1), self.d, seed)[:m]
        if single:
            for row in B:
                self.sk.update(row)
        else:
            self.sk.update(B)
        self.blocks.append(B)
        self.n += m

    @precondition(lambda self: self.n < 40)
    @rule(m=st.integers(0, 8), seed=SEED)
    def merge_other_partition(self, m, seed):
        B = make_keys("heavy_tailed", max(m, 1), self.d, seed)[:m]
        other = self.cls(self.d, self.eps, p=1.0).update(B, ids=np.arange(self.n, self.n + m))
        b = other.to_bytes()
        self.sk.merge(other)
        assert other.to_bytes() == b
        self.blocks.append(B)
        self.n += m

    @rule()
    def bytes_round_trip(self):
        b = self.sk.to_bytes()
        self.sk = self.cls.from_bytes(b)
        assert self.sk.to_bytes() == b

    @rule(bad=st.sampled_from(["nan", "columns", "corrupt", "merge_p2"]))
    def rejected_bad_input(self, bad):
        before = self.sk.to_bytes()
        with pytest.raises((ValueError, TypeError)):
            if bad == "nan":
                self.sk.update(np.full((2, self.d), np.nan))
            elif bad == "columns":
                self.sk.update(np.ones((2, self.d + 1)))
            elif bad == "corrupt":
                self.cls.from_bytes(before[:-1] + bytes([before[-1] ^ 1]))
            else:
                self.sk.merge(sl.LevSketch(self.d, self.eps).update(np.ones((1, self.d)), ids=[10**12]))
        assert self.sk.to_bytes() == before

    @invariant()
    def contains_exact_set(self):
        from streamlev.sensitivity import sensitivities

        _COUNT["steps"] += 1
        assert self.sk.n == self.n
        assert self.sk.num_retained <= self.cls.max_retained(self.d, self.eps, 1.0)
        K = self.model()
        if K.shape[0] == 0:
            return
        alpha = sensitivities(K, 1.0)
        U = set(self.sk.universal_set().tolist())
        must = np.flatnonzero(alpha >= self.eps * (1 + 1e-6))
        assert set(must.tolist()) <= U, (must, sorted(U), alpha)


LpSketchMachine.TestCase.settings = settings(
    max_examples=max(4, _EXAMPLES // 4), stateful_step_count=min(_STEPS, 12), deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
# A small budget by default (the oracle solves one LP per key); the long profile scales it up.
TestLpSketchStatefulP1 = LpSketchMachine.TestCase
