"""Do two threads working on two *different* sketches scale? (numba kernels are nogil, BLAS releases the GIL)

Measures, side by side in one run (median of several repetitions):

* serial: sketch A then sketch B, one thread;
* threads: A and B at the same time, one thread each;

for two workloads: prefill blocks (BLAS-3) and decode (one key at a time,
numba rank-one kernel plus small numpy calls, so the GIL is held part of the
time). Prints serial / threaded wall time (2.0 = perfect scaling on 2 cores).
Also checks that the threaded results equal the serial ones bit for bit.

    python benchmarks/bench_threads.py [--reps 5]

BLAS threads are pinned to 1 (OMP/OPENBLAS/MKL_NUM_THREADS) so that the
comparison is between Python threads, not BLAS's own pool.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import streamlev as sl  # noqa: E402


def prefill(K, d):
    sk = sl.LevSketch(d, 0.01)
    for s in range(0, K.shape[0], 4096):
        sk.update(K[s : s + 4096])
    return sk


def decode(K, d):
    sk = sl.LevSketch(d, 0.01).update(K[:d * 4])
    for row in K[d * 4:]:
        sk.update(row)
    return sk


def run(work, inputs, threaded):
    out = [None, None]

    def job(i):
        out[i] = work(*inputs[i])

    t0 = time.perf_counter()
    if threaded:
        ts = [threading.Thread(target=job, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    else:
        job(0)
        job(1)
    return time.perf_counter() - t0, out


def main(reps=5):
    rng = np.random.default_rng(0)
    cases = {
        "prefill d=128, 2 x 200k keys": (prefill, [(rng.standard_normal((200_000, 128)), 128) for _ in range(2)]),
        "decode  d=64,  2 x 5k keys  ": (decode, [(rng.standard_normal((5_000, 64)), 64) for _ in range(2)]),
    }
    print(f"cpus={os.cpu_count()} reps={reps} (median wall seconds; ratio = serial / threaded)")
    for name, (work, inputs) in cases.items():
        run(work, inputs, False)  # warm-up (numba cache, allocator)
        ser, thr = [], []
        for _ in range(reps):  # interleave so machine noise hits both alike
            t, a = run(work, inputs, False)
            ser.append(t)
            t, b = run(work, inputs, True)
            thr.append(t)
            assert all(x.to_bytes() == y.to_bytes() for x, y in zip(a, b)), "threaded result differs"
        s, t = statistics.median(ser), statistics.median(thr)
        print(f"{name}: serial {s:.3f} s, threaded {t:.3f} s, ratio {s / t:.2f}")


if __name__ == "__main__":
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 5
    main(reps)
