"""Numerical stress, long streams and thread safety of LevSketch (p = 2).

Every case either keeps the guarantee (no false negatives against the exact SVD
reference, with a tolerance set by the condition number) or raises a clear
ValueError that leaves the sketch bit-identical; scores are never NaN.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc

import numpy as np
import pytest
from scipy import linalg

import streamlev as sl
from streamlev import reference as ref
from streamlev.testing import assert_no_false_negatives, make_keys, score_tolerance

from ._compare import assert_matches_reference


def _check_guarantee(sk, K, *, cond=None, eps_list=None):
    """Exact set away from near-ties, finite scores, and no false negatives with a cond-based tolerance."""
    ids, tau = sk.scores()
    assert np.isfinite(tau).all() and np.all(tau >= sk.eps) and np.all(tau <= 1.0)
    assert_matches_reference(sk, K, eps_list=eps_list)
    tol = score_tolerance(K)
    if cond is not None:  # leverage error ~ u * cond (see the README's accuracy statement)
        tol = max(tol, 1e3 * np.finfo(float).eps * cond)
    assert_no_false_negatives(sk.universal_set(), K, sk.eps, rtol=1e-6 + tol / sk.eps)


# ------------------------------------------------------------ conditioning
@pytest.mark.parametrize("cond", [1e2, 1e6, 1e10, 1e12, 1e14])
@pytest.mark.parametrize("mode", ["block", "chunks", "single"])
def test_condition_numbers_up_to_1e14(cond, mode):
    K = make_keys("ill_conditioned", 300, 8, int(np.log10(cond)), cond=cond)
    sk = sl.LevSketch(8, 0.05)
    if mode == "block":
        sk.update(K)
    elif mode == "chunks":
        for s in range(0, 300, 23):
            sk.update(K[s : s + 23])
    else:
        for row in K:
            sk.update(row)
    _check_guarantee(sk, K, cond=cond, eps_list=[0.05, 0.2, 0.6])


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_exact_rank_deficiency(rank):
    rng = np.random.default_rng(rank)
    K = rng.standard_normal((400, rank)) @ rng.standard_normal((rank, 12))
    sk = sl.LevSketch(12, 0.02)
    for s in range(0, 400, 50):
        sk.update(K[s : s + 50])
    for row in K[:40]:  # the same keys again, one at a time (rank unchanged)
        sk.update(row)
    Kall = np.vstack([K, K[:40]])
    _check_guarantee(sk, Kall)
    assert sk.num_retained <= rank / 0.02 + 1e-9  # scores sum to the rank, not d


def test_exact_zero_keys_only_then_real_keys():
    sk = sl.LevSketch(5, 0.1)
    sk.update(np.zeros((100, 5)))
    for _ in range(10):
        sk.update(np.zeros(5))
    assert sk.universal_set().size == 0 and sk.n == 110
    K = np.vstack([np.zeros((110, 5)), make_keys("gaussian", 30, 5, 0)])
    sk.update(K[110:])
    _check_guarantee(sk, K)


# ------------------------------------------------------------ duplicates
def test_a_million_duplicates_of_a_few_keys_in_blocks():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 6))
    counts = np.array([400_000, 300_000, 299_990, 10])  # 1e6 keys; the last one is rare
    sk = sl.LevSketch(6, 0.01)
    t0 = time.perf_counter()
    for b, c in zip(base, counts):
        left = int(c)
        while left:
            m = min(left, 65_536)
            sk.update(np.broadcast_to(b, (m, 6)))
            left -= m
    elapsed = time.perf_counter() - t0
    assert sk.n == counts.sum()
    # exact scores: copies of key i share leverage 1/count_i on its own direction within span(base)
    Kexact = np.repeat(base, counts, axis=0)
    # SVD of 1e6 x 6 is fine but the comparison loop in assert_matches_reference is not: compare directly
    G = (base.T * counts) @ base
    tau_base = np.einsum("ij,ij->i", base @ np.linalg.pinv(G), base)
    ids, tau = sk.scores()
    assert np.isfinite(tau).all()
    want = np.flatnonzero(np.repeat(tau_base, counts) >= 0.01)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(tau, np.repeat(tau_base, counts)[want], rtol=1e-9)
    assert want.size == 10  # only the rare key's copies are heavy
    del Kexact
    print(f"1e6 duplicates in 64k blocks: {elapsed:.2f} s")


def test_duplicates_one_at_a_time_and_across_merge():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((3, 3))
    K = base[rng.integers(0, 3, 3000)]
    a = sl.LevSketch(3, 0.001)
    for row in K[:1500]:
        a.update(row)
    b = sl.LevSketch(3, 0.001).update(K[1500:], ids=np.arange(1500, 3000))
    a.merge(b)
    _check_guarantee(a, K)


# ------------------------------------------------------------ last-bit differences
def test_keys_differing_in_the_last_bit():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(6)
    rows = [x]
    for _ in range(40):
        rows.append(np.nextafter(rows[-1], np.inf))
    K = np.vstack(rows + [rng.standard_normal((20, 6))])
    for order in (slice(None), slice(None, None, -1)):
        Ko = K[order]
        sk = sl.LevSketch(6, 0.02)
        for row in Ko:
            sk.update(row)
        _check_guarantee(sk, Ko)
        sk2 = sl.LevSketch(6, 0.02).update(Ko)
        _check_guarantee(sk2, Ko)


# ------------------------------------------------------------ magnitudes
@pytest.mark.parametrize("exp10", [-300, -200, -150, 0, 150, 200, 300])
def test_each_magnitude_in_its_own_stream(exp10):
    K = make_keys("heavy_tailed", 200, 5, 3) * 10.0**exp10
    K = K / np.max(np.abs(K)) * 10.0**exp10  # keep max |K| finite at 1e300
    sk = sl.LevSketch(5, 0.05)
    for s in range(0, 150, 30):
        sk.update(K[s : s + 30])
    for row in K[150:]:
        sk.update(row)
    _check_guarantee(sk, K)


def test_subnormal_keys():
    K = make_keys("gaussian", 60, 4, 0) * 1e-310  # subnormal: few significant bits
    sk = sl.LevSketch(4, 0.1).update(K)
    tau = sk.scores()[1]
    assert np.isfinite(tau).all()
    assert_no_false_negatives(sk.universal_set(), K, 0.1, rtol=1e-3)


def test_1e_minus300_to_1e300_in_one_stream_works_or_raises_cleanly():
    rng = np.random.default_rng(4)
    blocks = [rng.standard_normal((20, 4)) * 10.0**e for e in (-300, -150, 0, 150, 300)]
    for order in (list(range(5)), list(range(4, -1, -1)), [2, 0, 4, 1, 3]):
        sk = sl.LevSketch(4, 0.05)
        seen = []
        for i in order:
            before = sk.to_bytes()
            try:
                sk.update(blocks[i])
            except ValueError as exc:
                assert "float64" in str(exc) or "rescale" in str(exc)
                assert sk.to_bytes() == before  # rejected blocks leave the sketch unchanged
                continue
            seen.append(blocks[i])
            ids, tau = sk.scores()
            assert np.isfinite(tau).all()
        K = np.vstack(seen)
        # accepted blocks: exact set of what was accepted (ids are n-based, so re-label)
        assert sk.n == K.shape[0]
        _check_guarantee(sk, K)


# ------------------------------------------------------------ dtypes
def test_float16_input_blocks_and_single_keys():
    K16 = (make_keys("heavy_tailed", 600, 8, 5)).astype(np.float16)
    assert np.isfinite(K16).all()
    sk = sl.LevSketch(8, 0.03)
    sk.update(K16[:300])
    for row in K16[300:]:
        sk.update(row)
    _check_guarantee(sk, K16.astype(np.float64))


def test_float16_overflowing_value_is_rejected_cleanly():
    K = np.full((3, 4), np.float16(60000)) * np.float16(2)  # inf in float16
    sk = sl.LevSketch(4, 0.1).update(np.ones((2, 4)))
    before = sk.to_bytes()
    with pytest.raises(ValueError, match="NaN or Inf"):
        sk.update(K)
    assert sk.to_bytes() == before


# ------------------------------------------------------------ large d
def test_d_1024_moderate():
    rng = np.random.default_rng(6)
    d, n = 1024, 2600
    K = rng.standard_normal((n, d)) * np.exp(rng.standard_normal((n, 1)))
    K[:300, 512:] = 0.0  # early keys live in a subspace: they are heavy until the rest arrives
    sk = sl.LevSketch(d, 0.5)
    for s in range(0, 2500, 700):
        sk.update(K[s : min(s + 700, 2500)])
    for row in K[2500:]:
        sk.update(row)
    ids, tau = sk.scores()
    assert np.isfinite(tau).all()
    tau_ref = ref.leverage_scores(K)
    tol = score_tolerance(K)
    np.testing.assert_allclose(tau, tau_ref[ids], rtol=1e-9, atol=tol)
    far = np.abs(tau_ref - 0.5) > tol
    np.testing.assert_array_equal(sk.universal_set(), np.flatnonzero((tau_ref >= 0.5) & far)
                                  if far.all() else sk.universal_set())
    assert set(np.flatnonzero((tau_ref >= 0.5) & far)) <= set(ids.tolist())
    assert sk.num_retained <= sl.LevSketch.max_retained(d, 0.5)


# ------------------------------------------------------------ threads
def test_concurrent_updates_from_two_threads_on_one_sketch():
    K = make_keys("heavy_tailed", 4000, 8, 9)
    sk = sl.LevSketch(8, 0.02)
    errors = []

    def worker(rows, ids, single):
        try:
            if single:
                for r, i in zip(rows, ids):
                    sk.update(r, ids=[i])
            else:
                for s in range(0, rows.shape[0], 97):
                    sk.update(rows[s : s + 97], ids=ids[s : s + 97])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ids = np.arange(4000)
    t1 = threading.Thread(target=worker, args=(K[:2000], ids[:2000], False))
    t2 = threading.Thread(target=worker, args=(K[2000:2600], ids[2000:2600], True))
    t3 = threading.Thread(target=worker, args=(K[2600:], ids[2600:], False))
    for t in (t1, t2, t3):
        t.start()
    for t in (t1, t2, t3):
        t.join()
    assert not errors, errors
    # the order of interleaving is arbitrary, but the set is order-independent
    assert_matches_reference(sk, K, ids=ids)


def test_concurrent_queries_and_merges_do_not_corrupt():
    K = make_keys("gaussian", 3000, 6, 10)
    sk = sl.LevSketch(6, 0.01).update(K[:100])
    parts = [sl.LevSketch(6, 0.01).update(K[a : a + 100], ids=np.arange(a, a + 100))
             for a in range(100, 3000, 100)]
    errors = []

    def merger():
        try:
            for p in parts:
                sk.merge(p)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    def reader():
        try:
            for _ in range(200):
                ids, tau = sk.scores()
                assert np.isfinite(tau).all() and ids.size == tau.size
                sl.LevSketch.from_bytes(sk.to_bytes())
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    ts = [threading.Thread(target=merger), threading.Thread(target=reader)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert_matches_reference(sk, K)


# ------------------------------------------------------------ long stream (not in default CI)
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _long_chunk(c, chunk, d, seed=2024):
    """Deterministic chunk c of the long stream: Gaussian keys plus a few planted heavy keys."""
    rng = np.random.default_rng([seed, c])
    K = rng.standard_normal((chunk, d))
    pos = rng.choice(chunk, size=2, replace=False)
    K[pos] *= rng.uniform(200, 3000, size=(2, 1))  # final leverage from ~0.004 to ~0.5
    return K


@pytest.mark.slow
def test_ten_million_single_key_updates_d32():
    """10^7 one-key updates (d = 32): exact set at checkpoints and at the end, flat memory, no drift.

    The exact model is an independent Householder QR of the whole prefix
    (scipy.linalg.qr on [R; chunk]), and the scores of *all* keys are recomputed
    from it at each checkpoint. STREAMLEV_LONG_N shortens the run.
    """
    n = int(os.environ.get("STREAMLEV_LONG_N", "10000000"))
    d, eps, chunk = 32, 0.02, 100_000
    nchunks = max(1, n // chunk)
    checkpoints = {nchunks // 4, nchunks // 2, nchunks - 1} | {0}
    sk = sl.LevSketch(d, eps)
    R_ref = np.zeros((d, d))
    rss, nbytes, traced_growth, t_update, n_timed = [], [], [], 0.0, 0
    for c in range(nchunks):
        K = _long_chunk(c, chunk, d)
        traced = c in (1, nchunks - 1) and nchunks > 2
        if traced:  # allocations that survive 10^5 updates would show up here
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        for row in K:
            sk.update(row)
        if not traced:  # tracemalloc slows Python several-fold: time only untraced chunks
            t_update += time.perf_counter() - t0
            n_timed += chunk
        if traced:
            now, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            traced_growth.append((now - before, peak - before))
        if c in checkpoints:
            rss.append(_rss_bytes())  # measured before the (large, temporary) reference work
        R_ref = linalg.qr(np.vstack([R_ref, K]), mode="r", check_finite=False)[0][:d]
        if c in checkpoints:
            seen = (c + 1) * chunk
            assert sk.n == seen
            # Gram matrix: no drift of the factor
            G_ref = R_ref.T @ R_ref
            assert np.linalg.norm(sk.gram - G_ref) <= 1e-11 * np.linalg.norm(G_ref)
            # exact scores of every key seen so far, from the independent factor
            tau_all = np.concatenate([
                np.sum(linalg.solve_triangular(R_ref, _long_chunk(j, chunk, d).T, trans="T") ** 2, axis=0)
                for j in range(c + 1)])
            ids, tau = sk.scores()
            assert np.isfinite(tau).all()
            np.testing.assert_allclose(tau, tau_all[ids], rtol=1e-9)
            far = np.abs(tau_all - eps) > 1e-9
            want = np.flatnonzero((tau_all >= eps) & far)
            got = sk.universal_set()
            assert set(want.tolist()) <= set(got.tolist())
            assert set(got.tolist()) - set(want.tolist()) <= set(np.flatnonzero(~far).tolist())
            assert sk.num_retained <= sl.LevSketch.max_retained(d, eps)
            nbytes.append(sk.nbytes)
            print(f"checkpoint {seen}: retained={sk.num_retained} exact={want.size} "
                  f"rss={rss[-1] / 2**20:.1f} MiB sketch={nbytes[-1]} B "
                  f"us/key={1e6 * t_update / max(n_timed, 1):.1f}", flush=True)
    # flat memory: 10^5 updates leave no allocation behind and never hold more than ~the sketch
    print(f"traced (growth, peak) over 1e5 updates: {traced_growth}; rss MiB: {[x >> 20 for x in rss]}")
    for growth, peak in traced_growth:
        assert growth < 64 * 1024 and peak < 2**20, traced_growth
    # RSS also includes the test's own reference computation (freed, but not always returned to the OS)
    assert rss[-1] - rss[0] < 256 * 2**20, rss
    assert max(nbytes) <= 2 * d * d * 8 + sl.LevSketch.max_retained(d, eps) * (d + 2) * 8 * 2
