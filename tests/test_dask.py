"""streamlev.dask: tree reductions over dask arrays equal the single-process sketch.

One real ``distributed.LocalCluster`` (2 worker processes) is shared by the
module; the worker-failure test runs last because it kills a worker.
"""

from __future__ import annotations

import os
import pickle
import signal
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
from dask.delayed import Delayed  # noqa: E402

import streamlev as sl  # noqa: E402
from streamlev import dask as sldask  # noqa: E402
from streamlev.testing import key_matrices, random_partition  # noqa: E402

from ._compare import assert_matches_reference  # noqa: E402

HAS_LP = hasattr(sl, "LpSketch")
OTHER_P = [pytest.param(3.0, marks=pytest.mark.skipif(not HAS_LP, reason="streamlev.LpSketch not available"))]


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    cl = distributed.Client(cluster, set_as_default=False)
    try:
        yield cl
    finally:
        cl.close()
        cluster.close()


@pytest.fixture(scope="module")
def npy_keys(tmp_path_factory):
    """Heavy-tailed float32 keys saved to disk, the single-process input and its path."""
    rng = np.random.default_rng(7)
    K = (rng.standard_normal((24_000, 12)) * rng.lognormal(0, 1, (24_000, 1))).astype(np.float32)
    path = tmp_path_factory.mktemp("keys") / "keys.npy"
    np.save(path, K)
    return path, K


def _single(K, eps, p=2.0, ids=None):
    cls = sldask.sketch_class(p)
    return cls(K.shape[1], eps, p=p).update(K, ids=ids)


def assert_same_sketch(got, want):
    """Same n, same retained ids (the universal set), and scores equal to float64 accuracy."""
    assert type(got) is type(want)
    assert (got.n, got.d, got.eps, got.p) == (want.n, want.d, want.eps, want.p)
    gi, gt = got.scores()
    wi, wt = want.scores()
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_allclose(gt, wt, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(got.universal_set(), want.universal_set())


def _on(client):
    return dask.config.set(scheduler=client)


# ----------------------------------------------------------- default scheduler
@given(K=key_matrices(max_n=80, max_d=6), seed=st.integers(0, 2**31), split_every=st.integers(2, 5),
       offset=st.integers(0, 10**12), transport=st.sampled_from(["bytes", "pickle"]))
def test_any_chunking_equals_reference(K, seed, split_every, offset, transport):
    """Any row chunking, fan-in, id offset and transport give the exact offline universal set and scores."""
    rows = tuple(b - a for a, b in random_partition(K.shape[0], seed, max_parts=7))
    x = da.from_array(K, chunks=(rows, max(1, K.shape[1] // 2)))  # several column chunks too
    with dask.config.set(scheduler="sync"):
        sk = sldask.sketch_array(x, 0.1, split_every=split_every, ids_offset=offset, transport=transport)
    ids = np.arange(offset, offset + K.shape[0])
    assert_matches_reference(sk, K, ids=ids, eps_list=[0.1, 0.3])


@pytest.mark.parametrize("transport", ["bytes", "pickle"])
def test_threaded_scheduler_matches_single_process(npy_keys, transport):
    path, K = npy_keys
    x = da.from_array(np.load(path, mmap_mode="r"), chunks=(1_700, 12))
    with dask.config.set(scheduler="threads"):
        sk = sldask.sketch_array(x, 0.002, split_every=3, transport=transport)
    assert_same_sketch(sk, _single(K, 0.002))


def test_compute_false_returns_delayed_and_merges_across_arrays():
    """Two arrays sketched with disjoint ids_offset merge into the sketch of their concatenation."""
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((900, 5)), rng.standard_normal((700, 5)) * 3
    with dask.config.set(scheduler="threads"):
        la = sldask.sketch_array(da.from_array(A, chunks=200), 0.01, compute=False)
        lb = sldask.sketch_array(da.from_array(B, chunks=300), 0.01, ids_offset=900, compute=False)
        assert isinstance(la, Delayed)
        a, b = dask.compute(la, lb)
    b_before = b.to_bytes()
    merged = a.merge(b)
    assert merged is a and b.to_bytes() == b_before  # the documented merge contract
    assert_same_sketch(merged, _single(np.vstack([A, B]), 0.01))


def test_merge_task_never_mutates_its_inputs():
    """A retried task may see the same input object again: merging must leave inputs untouched."""
    rng = np.random.default_rng(4)
    parts = [sl.LevSketch(4, 0.05).update(rng.standard_normal((50, 4)), ids=np.arange(50 * i, 50 * i + 50))
             for i in range(3)]
    before = [p.to_bytes() for p in parts]
    first = sldask._merge_parts(parts, sl.LevSketch, 4, 0.05, 2.0, {}, "pickle")
    second = sldask._merge_parts(parts, sl.LevSketch, 4, 0.05, 2.0, {}, "pickle")  # a "retry"
    assert [p.to_bytes() for p in parts] == before
    assert first.to_bytes() == second.to_bytes()
    assert first is not parts[0]


def test_partial_sketches_shared_by_two_trees_are_not_double_counted():
    """Two trees over the same chunks share their leaf tasks (same keys): each partial sketch object
    feeds two merge tasks in one graph, so any mutation of an input would corrupt one of the results."""
    K = np.random.default_rng(5).standard_normal((3_000, 6))
    x = da.from_array(K, chunks=500)
    with dask.config.set(scheduler="threads"):
        t2 = sldask.sketch_array(x, 0.01, split_every=2, transport="pickle", compute=False)
        t3 = sldask.sketch_array(x, 0.01, split_every=3, transport="pickle", compute=False)
        leaves2 = {k for k in t2.dask if str(k).startswith("_chunk_sketch")}
        leaves3 = {k for k in t3.dask if str(k).startswith("_chunk_sketch")}
        assert leaves2 == leaves3 and len(leaves2) == 6
        one, two = dask.compute(t2, t3)
    assert one is not two
    assert_same_sketch(one, _single(K, 0.01))
    assert_same_sketch(two, _single(K, 0.01))


def test_heads_threaded_match_per_head_sketches():
    rng = np.random.default_rng(6)
    K = rng.standard_normal((2, 3, 500, 4)) * rng.lognormal(0, 1, (2, 3, 500, 1))
    with dask.config.set(scheduler="threads"):
        out4 = sldask.sketch_heads(da.from_array(K, chunks=(1, 2, 130, 2)), 0.02, split_every=2)
        out3 = sldask.sketch_heads(da.from_array(K[1], chunks=(1, 170, 4)), 0.02, ids_offset=10)
    assert len(out4) == 2 and all(len(row) == 3 for row in out4)
    for layer in range(2):
        for head in range(3):
            assert_same_sketch(out4[layer][head], _single(K[layer, head], 0.02))
    for head in range(3):
        assert_same_sketch(out3[head], _single(K[1, head], 0.02, ids=np.arange(10, 510)))


def test_from_npy_reads_rows_in_the_tasks(tmp_path):
    K = np.random.default_rng(10).standard_normal((3, 500, 4)).astype(np.float32)
    np.save(tmp_path / "k3.npy", K)
    np.save(tmp_path / "k2.npy", K[2])
    x3, x2 = sldask.from_npy(tmp_path / "k3.npy", 120), sldask.from_npy(str(tmp_path / "k2.npy"), 120)
    assert x3.chunks[0] == (1, 1, 1) and x3.chunks[1][0] == 120 and x3.dtype == np.float32
    assert len(pickle.dumps(dict(x3.__dask_graph__()))) < 10_000  # the graph holds the path, not the keys
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(x3.compute(), K)
        out = sldask.sketch_heads(x3, 0.02)
        one = sldask.sketch_array(x2, 0.02)
    for h in range(3):
        assert_same_sketch(out[h], _single(K[h], 0.02))
    assert_same_sketch(one, out[2])
    np.save(tmp_path / "k1.npy", K[0, 0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        sldask.from_npy(tmp_path / "k1.npy")
    with pytest.raises(ValueError, match="chunks"):
        sldask.from_npy(tmp_path / "k2.npy", 0)


def test_validation_fails_before_any_task_runs():
    x = da.zeros((10, 3), chunks=5)
    with pytest.raises(TypeError, match="dask.array.from_array"):
        sldask.sketch_array(np.zeros((10, 3)), 0.1)
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        sldask.sketch_array(da.zeros((2, 10, 3)), 0.1)
    with pytest.raises(ValueError, match="at least one group axis"):
        sldask.sketch_heads(x, 0.1)
    with pytest.raises(ValueError, match="split_every"):
        sldask.sketch_array(x, 0.1, split_every=1)
    with pytest.raises(ValueError, match="ids_offset"):
        sldask.sketch_array(x, 0.1, ids_offset=-1)
    with pytest.raises(ValueError, match="transport"):
        sldask.sketch_array(x, 0.1, transport="json")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        sldask.sketch_array(x, 1.5)
    with pytest.raises(ValueError, match="rtol"):
        sldask.sketch_array(x, 0.1, rtol=2.0)
    with pytest.raises(TypeError, match="real numbers"):
        sldask.sketch_array(da.zeros((10, 3), dtype=bool), 0.1)
    unknown = da.from_array(np.ones((10, 3)), chunks=5)
    unknown = unknown[unknown[:, 0] > 0]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        sldask.sketch_array(unknown, 0.1)
    if not HAS_LP:
        with pytest.raises(ValueError, match="LpSketch"):
            sldask.sketch_array(x, 0.1, p=3.0)


def test_nan_keys_raise_not_silently_dropped():
    K = np.random.default_rng(8).standard_normal((100, 3))
    K[77, 1] = np.nan
    with dask.config.set(scheduler="threads"), pytest.raises(ValueError, match="NaN"):
        sldask.sketch_array(da.from_array(K, chunks=30), 0.1)


# ---------------------------------------------------------------- the cluster
@pytest.mark.parametrize(("transport", "reader"), [("bytes", "mmap"), ("pickle", "from_npy")])
def test_cluster_from_npy_on_disk_equals_single_process(client, npy_keys, transport, reader):
    """Keys spilled to .npy, read by 2 worker processes, tree-merged: the same sketch as one process."""
    path, K = npy_keys
    if reader == "mmap":
        x = da.from_array(np.load(path, mmap_mode="r"), chunks=(2_000, 6))  # 12 row chunks, 2 column chunks
    else:
        x = sldask.from_npy(path, 2_000)  # the workers open the file themselves
    with _on(client), distributed.get_task_stream(client) as ts:
        sk = sldask.sketch_array(x, 0.002, split_every=3, transport=transport)
    workers = {t["worker"] for t in ts.data}
    assert len(workers) == 2, workers  # both processes did work: sketches crossed process boundaries
    assert_same_sketch(sk, _single(K, 0.002))
    assert_matches_reference(sk, K.astype(np.float64), eps_list=[0.002, 0.01])


def _certified_heavy(K, p, eps, top=300):
    """Keys that provably receive |x|^p share >= eps: the query (K^T K)^-1 k_j gives a lower bound."""
    K = K.astype(np.float64)
    G = K.T @ K
    lev = np.einsum("ij,ij->i", K, np.linalg.solve(G, K.T).T)
    cand = np.argsort(lev)[-top:]
    Q = np.linalg.solve(G, K[cand].T).T
    A = np.abs(Q @ K.T) ** p
    share = A[np.arange(cand.size), cand] / A.sum(axis=1)
    return np.sort(cand[share >= eps])


@pytest.mark.parametrize("transport", ["bytes", "pickle"])
@pytest.mark.parametrize("p", OTHER_P)
def test_cluster_other_p_equals_same_tree_in_one_process(client, npy_keys, transport, p):
    """p != 2: LpSketch keeps a partition-dependent *superset*, so the cluster result must equal the same
    tree run in one process, contain every key certified heavy, and respect the size bound."""
    path, K = npy_keys
    n, eps = 4_000, 0.1
    x = da.from_array(np.load(path, mmap_mode="r")[:n], chunks=(1_000, 12))
    with _on(client), distributed.get_task_stream(client) as ts:
        sk = sldask.sketch_array(x, eps, p=p, split_every=2, transport=transport)
    assert len({t["worker"] for t in ts.data}) == 2
    with dask.config.set(scheduler="sync"):
        same_tree = sldask.sketch_array(x, eps, p=p, split_every=2, transport=transport)
    assert_same_sketch(sk, same_tree)
    heavy = _certified_heavy(K[:n], p, eps)
    assert heavy.size > 0  # the check below is not vacuous
    assert np.isin(heavy, sk.universal_set()).all()
    assert sk.n == n and sk.num_retained <= type(sk).max_retained(sk.d, eps, p)


def test_cluster_heads(client):
    rng = np.random.default_rng(9)
    K = (rng.standard_normal((2, 2, 3_000, 8)) * rng.lognormal(0, 1, (2, 2, 3_000, 1))).astype(np.float32)
    with _on(client):
        out = sldask.sketch_heads(da.from_array(K, chunks=(1, 1, 700, 8)), 0.01, transport="pickle")
    for layer in range(2):
        for head in range(2):
            assert_same_sketch(out[layer][head], _single(K[layer, head], 0.01))


def _slow(block):
    time.sleep(0.2)  # long enough to kill a worker while chunks are being sketched
    return block


def test_worker_killed_mid_reduction_recovers_exactly_or_raises(client, npy_keys):
    """SIGKILL one worker process while the tree runs: the answer is exact, or an error is raised."""
    path, K = npy_keys
    x = da.from_array(np.load(path, mmap_mode="r"), chunks=(2_000, 12)).map_blocks(_slow, dtype=K.dtype)
    want = _single(K, 0.002)
    pids = client.run(os.getpid)
    lazy = sldask.sketch_array(x, 0.002, split_every=2, compute=False)
    future = client.compute(lazy)
    victim = None
    deadline = time.monotonic() + 20
    while victim is None and time.monotonic() < deadline:
        # wait until the victim holds finished partial results *and* is running more tasks
        has, busy = client.has_what(), client.processing()
        for addr in pids:
            if has.get(addr) and busy.get(addr):
                victim = addr
                break
        time.sleep(0.05)
    assert victim is not None, "the graph finished before a worker could be killed; make _slow slower"
    t_kill = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    try:
        got = future.result(timeout=60)
    except Exception as exc:  # allowed: an error, never a silently wrong sketch
        assert isinstance(exc, (distributed.KilledWorker, OSError, TimeoutError)), repr(exc)
        print(f"worker killed: the computation raised {exc!r}")
    else:
        assert_same_sketch(got, want)
        print(f"worker killed: Dask recomputed the lost tasks; the sketch is exact (n={got.n}), "
              f"{time.monotonic() - t_kill:.1f} s after the kill")
    # This test stays last in the module: the nanny is still restarting the killed worker.
