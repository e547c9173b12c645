"""Block (prefill) path with one vs two workers (LevSketch(workers=)), side by side in one run.

Run:  python benchmarks/bench_block_workers.py [--n 262144] [--repeats 5]

Same keys as bench_block.py (float32, heavy-tailed norms, blocks of 4096, eps = 0.01).
The two settings alternate within each repetition; prints the median time and the
effective rate 2 n d^2 / t as a share of the machine's one- and two-thread dgemm
rate measured in the same run, and checks that both give the same universal set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dgemm_rate, environment  # noqa: E402
from bench_block import BLOCK, keys  # noqa: E402

import streamlev as sl  # noqa: E402


def run(K, eps, workers):
    t = time.perf_counter()
    sk = sl.LevSketch(K.shape[1], eps, workers=workers)
    for s in range(0, K.shape[0], BLOCK):
        sk.update(K[s : s + BLOCK])
    U = sk.universal_set()
    return time.perf_counter() - t, U


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.01)
    args = ap.parse_args()
    print(environment())
    with threadpool_limits(1):
        r1 = dgemm_rate()
    with threadpool_limits(2):
        r2 = dgemm_rate()
    print(f"dgemm: {r1 / 1e9:.1f} GFLOP/s one thread, {r2 / 1e9:.1f} GFLOP/s two threads")
    print("| d | workers | time | GFLOP/s | % dgemm (2 threads) | % dgemm (1 thread) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for d in (64, 128):
        K = keys(args.n, d)
        run(K, args.eps, 2)  # warm-up (pool threads, allocator)
        ts = {1: [], 2: []}
        sets = {}
        for _ in range(args.repeats):
            for w in (1, 2):
                t, sets[w] = run(K, args.eps, w)
                ts[w].append(t)
        assert np.array_equal(sets[1], sets[2]), "workers=1 and workers=2 disagree"
        med = {w: float(np.median(v)) for w, v in ts.items()}
        for w in (1, 2):
            rate = 2.0 * args.n * d * d / med[w]
            print(f"| {d} | {w} | {med[w]:.3f} s | {rate / 1e9:.1f} | {100 * rate / r2:.1f}% | "
                  f"{100 * rate / r1:.1f}% | {med[1] / med[w]:.2f}x |")


if __name__ == "__main__":
    main()
