"""Does a Dask cluster of 2 worker processes sketch keys from disk faster than 1?

Keys: n x d float32 in a ``.npy`` file (written once, deterministic), read by the
workers through :func:`streamlev.dask.from_npy` (the graph holds the path).
Two ``distributed.LocalCluster`` s (processes, 1 thread each, BLAS pinned to
1 thread by Dask's worker defaults) run :func:`streamlev.dask.sketch_array`,
alternating 1-worker and 2-worker runs so that machine load hits both alike.
Prints the median wall time of each and their ratio (the speedup; 2.0 is
perfect on 2 cores), and the peak memory of every worker process during the
runs, sampled every 50 ms with psutil: RSS, and RSS minus file-backed shared
pages (the memory-mapped keys), which is the worker's own memory.

    python benchmarks/bench_dask.py [--n 4000000] [--d 64] [--reps 3] [--chunk 65536]

The machine is shared: check ``uptime`` first and run when the load is low.
Measured (2-core VM, 3 runs; the load average came from other jobs): at load ~21,
90.1 s vs 91.6 s (0.98x); at ~12, 31.4 s vs 51.3 s (0.61x); at ~10, 22.5 s vs
22.2 s (1.02x). Peak per worker about 205-220 MiB RSS, 110-127 MiB own. No
speedup was measurable under that load (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment  # noqa: E402


def make_keys(path, n, d, seed=0, block=262_144):
    """Heavy-tailed float32 keys written block by block (no n x d float64 temporary)."""
    if os.path.exists(path):
        mm = np.load(path, mmap_mode="r")
        if mm.shape == (n, d) and mm.dtype == np.float32:
            return
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, block):
        m = min(block, n - s)
        out[s : s + m] = rng.standard_normal((m, d), dtype=np.float32) * rng.lognormal(0, 1, (m, 1))
    out.flush()
    del out
    os.replace(path + ".tmp.npy", path)


class PeakMemory:
    """Sample the RSS (and RSS minus shared file pages) of some processes until stopped; keep the peaks."""

    def __init__(self, pids, period=0.05):
        import psutil

        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.peak = {pid: (0, 0) for pid in pids}
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for pid, proc in self.procs.items():
                try:
                    mi = proc.memory_info()
                except Exception:  # a worker that exited
                    continue
                rss, own = self.peak[pid]
                self.peak[pid] = (max(rss, mi.rss), max(own, mi.rss - mi.shared))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=65_536, help="rows per chunk")
    ap.add_argument("--split-every", type=int, default=8)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the .npy file is written (kept)")
    args = ap.parse_args(argv)

    import logging

    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # the scheduler runs in this process

    from streamlev.dask import from_npy, sketch_array

    path = os.path.join(args.dir, f"streamlev_bench_keys_{args.n}x{args.d}.npy")
    t = time.perf_counter()
    make_keys(path, args.n, args.d)
    print(f"keys: {path} ({os.path.getsize(path) / 2**30:.2f} GiB, ready in {time.perf_counter() - t:.1f} s)")
    print(environment())
    x = from_npy(path, args.chunk)
    print(f"n={args.n} d={args.d} eps={args.eps} chunks={len(x.chunks[0])} x {args.chunk} rows, "
          f"split_every={args.split_every}")

    clusters, clients, pids = {}, {}, {}
    results = {}
    times = {1: [], 2: []}
    peaks = {1: [], 2: []}
    try:
        for w in (1, 2):
            clusters[w] = LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
            clients[w] = Client(clusters[w], set_as_default=False)
            pids[w] = list(clients[w].run(os.getpid).values())

        def run(w):
            with PeakMemory(pids[w]) as mem:
                t0 = time.perf_counter()
                sk = sketch_array(x, args.eps, split_every=args.split_every, compute=False)
                sk = clients[w].compute(sk).result()
                dt = time.perf_counter() - t0
            return sk, dt, mem.peak

        for w in (1, 2):  # warm-up: imports and numba cache in the workers, file pages in the OS cache
            results[w], dt, _ = run(w)
            print(f"warm-up {w} worker(s): {dt:.2f} s")
        for rep in range(args.reps):
            for w in ((1, 2) if rep % 2 == 0 else (2, 1)):
                sk, dt, peak = run(w)
                times[w].append(dt)
                peaks[w].append(peak)
                assert np.array_equal(sk.universal_set(), results[1].universal_set())
                print(f"rep {rep} {w} worker(s): {dt:6.2f} s  load {os.getloadavg()[0]:.2f}  peak per worker "
                      + ", ".join(f"RSS {r / 2**20:.0f} MiB / own {o / 2**20:.0f} MiB" for r, o in peak.values()))
    finally:
        for w in clients:
            clients[w].close()
            clusters[w].close()

    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    print()
    print(f"median of {args.reps}: 1 worker {t1:.2f} s, 2 workers {t2:.2f} s, speedup {t1 / t2:.2f}x "
          f"({args.n / t1 / 1e6:.2f} vs {args.n / t2 / 1e6:.2f} M keys/s)")
    for w in (1, 2):
        rss = max(r for p in peaks[w] for r, _ in p.values())
        own = max(o for p in peaks[w] for _, o in p.values())
        print(f"{w} worker(s): max over workers and reps of the peak RSS {rss / 2**20:.0f} MiB, "
              f"of the peak own memory (RSS - shared file pages) {own / 2**20:.0f} MiB")
    sk = results[1]
    print(f"sketch: {sk!r}; {sk.nbytes / 2**20:.2f} MiB; same universal set on 1 and 2 workers in every run")


if __name__ == "__main__":
    main()
