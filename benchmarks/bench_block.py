"""Block (prefill) throughput of the exact p=2 sketch against offline leverage computations.

Run:  python benchmarks/bench_block.py [--n 262144] [--repeats 3]

Prints, side by side in one run on the same float32 keys fed in blocks of 4096:
  * the LevSketch time (update over all blocks, then universal_set),
  * numpy.linalg.qr leverage (row norms of Q, the textbook way),
  * offline chunked Gram + Cholesky leverage (the best one can do offline with numpy),
  * the effective rate 2 n d^2 / t against the machine's dgemm rate measured in the same run,
and checks that all three give the same universal set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.linalg as sla

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dgemm_rate, environment, median_time  # noqa: E402

import streamlev as sl  # noqa: E402

BLOCK = 4096


def keys(n, d, seed=0):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((n, d)).astype(np.float32)
    K *= rng.lognormal(0.0, 1.0, (n, 1)).astype(np.float32)  # heavy-tailed norms, as real keys have
    return K


def run_sketch(K, eps):
    sk = sl.LevSketch(K.shape[1], eps)
    for s in range(0, K.shape[0], BLOCK):
        sk.update(K[s : s + BLOCK])
    return sk.universal_set()


def qr_leverage(K):
    Q = np.linalg.qr(K.astype(np.float64), mode="reduced")[0]
    return np.einsum("ij,ij->i", Q, Q)


def gram_cholesky_leverage(K, chunk=BLOCK):
    d = K.shape[1]
    M = np.zeros((d, d))
    for s in range(0, K.shape[0], chunk):
        C = K[s : s + chunk].astype(np.float64)
        M += C.T @ C
    L = np.linalg.cholesky(M)
    tau = np.empty(K.shape[0])
    for s in range(0, K.shape[0], chunk):
        Y = sla.solve_triangular(L, K[s : s + chunk].astype(np.float64).T, lower=True, check_finite=False)
        tau[s : s + chunk] = np.einsum("ij,ij->j", Y, Y)
    return tau


def chunk_sweep(d, n=262144):
    K = keys(n, d).astype(np.float64)
    out = {"whole": median_time(lambda: K.T @ K, 3)}
    for c in (512, 1024, 2048, 4096, 8192, 16384):
        def f(c=c):
            M = np.zeros((d, d))
            for s in range(0, n, c):
                M += K[s : s + c].T @ K[s : s + c]
        out[c] = median_time(f, 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also time K.T @ K whole vs chunked")
    args = ap.parse_args(argv)
    print(environment())
    rate = dgemm_rate()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        rate1 = dgemm_rate()
    print(f"dgemm rate (2048^3, median of 5): {rate / 1e9:.1f} GFLOP/s with the default BLAS threads, "
          f"{rate1 / 1e9:.1f} GFLOP/s with one (the sketch runs BLAS single-threaded, see LevSketch(blas_threads=))")
    print(f"{'d':>4} {'eps':>5} {'|U|':>6} {'sketch s':>9} {'qr s':>8} {'gram+chol s':>12} "
          f"{'vs qr':>7} {'vs gram':>8} {'%dgemm':>7} {'%dgemm1':>8}")
    for d in (64, 128):
        K = keys(args.n, d)
        for eps in (0.01, 0.1):
            U = run_sketch(K, eps)
            assert np.array_equal(U, np.flatnonzero(gram_cholesky_leverage(K) >= eps)), "sets differ"
            t_sk = median_time(lambda: run_sketch(K, eps), args.repeats)
            t_qr = median_time(lambda: qr_leverage(K), args.repeats)
            t_gc = median_time(lambda: gram_cholesky_leverage(K), args.repeats)
            eff = 2.0 * args.n * d * d / t_sk
            print(f"{d:>4} {eps:>5} {U.size:>6} {t_sk:>9.4f} {t_qr:>8.4f} {t_gc:>12.4f} "
                  f"{t_qr / t_sk:>6.1f}x {t_gc / t_sk:>7.2f}x {100 * eff / rate:>6.1f}% {100 * eff / rate1:>7.1f}%")
    if args.sweep:
        for d in (64, 128):
            sw = chunk_sweep(d, args.n)
            print(f"d={d}: K.T@K whole {sw.pop('whole') * 1e3:.1f} ms; chunked: "
                  + ", ".join(f"{c}: {t * 1e3:.1f} ms" for c, t in sw.items()))


if __name__ == "__main__":
    main()
