"""Per-token (decode) cost of the exact p=2 sketch against re-scoring all retained keys from scratch.

Run:  python benchmarks/bench_decode.py [--d 128] [--eps 0.1] [--prefill 4096] [--tokens 3000]
      python benchmarks/bench_decode.py --long 1000000 --d 32     # drift check after 1e6 single-key updates
      python benchmarks/bench_decode.py --streams                 # four differently behaved streams

The baseline keeps the Gram matrix (rank-one update, O(d^2)) and, per key, factors it
(Cholesky, O(d^3/3)) and re-scores every retained key (triangular solve, O(r d^2)):
the straightforward exact way to know after every token which keys stay. The sketch
folds the key into its triangular factor with Givens rotations (which also yield the key's
whitened form and leverage), does one triangular solve, and updates the retained scores
with the Sherman-Morrison formula through one matrix-vector product, O(d^2 + r d). Both
are run side by side on the same keys; the retained sets are checked to agree. The last
line prints the flop ratio of the two methods and each one's achieved rate: the speedup
is the work ratio times the ratio of rates (BLAS-2 for the sketch, BLAS-3 for the baseline).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg as sla

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

import streamlev as sl  # noqa: E402
from streamlev import reference as ref  # noqa: E402


def keys(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.lognormal(0.0, 1.0, (n, 1))


def baseline(K, prefill, eps):
    """Exact per-key re-scoring from scratch; returns (seconds per key, final retained ids)."""
    d = K.shape[1]
    M = K[:prefill].T @ K[:prefill]
    L = np.linalg.cholesky(M)
    tau = np.einsum("ij,ij->j", *(2 * [sla.solve_triangular(L, K[:prefill].T, lower=True)]))
    ret = np.flatnonzero(tau >= eps)
    t = time.perf_counter()
    for i in range(prefill, K.shape[0]):
        x = K[i]
        M += np.outer(x, x)
        L = sla.cholesky(M, lower=True, check_finite=False)
        cand = np.append(ret, i)
        Y = sla.solve_triangular(L, K[cand].T, lower=True, check_finite=False)
        ret = cand[np.einsum("ij,ij->j", Y, Y) >= eps]
    dt = (time.perf_counter() - t) / (K.shape[0] - prefill)
    return dt, ret, d


def sketch(K, prefill, eps):
    sk = sl.LevSketch(K.shape[1], eps).update(K[:prefill])
    sizes = []
    t = time.perf_counter()
    for i in range(prefill, K.shape[0]):
        sk.update(K[i])
        sizes.append(sk.num_retained)
    dt = (time.perf_counter() - t) / (K.shape[0] - prefill)
    return dt, sk, float(np.mean(sizes))


def long_run(n, d, eps):
    K = keys(n, d, seed=1)
    sk = sl.LevSketch(d, eps).update(K[: 4 * d])
    t = time.perf_counter()
    for i in range(4 * d, n):
        sk.update(K[i])
    dt = (time.perf_counter() - t) / (n - 4 * d)
    ids, tau = sk.scores()
    exact = sl.leverage_scores(K)  # streaming offline computation of all n scores
    rel = float(np.max(np.abs(tau - exact[ids]) / exact[ids])) if ids.size else 0.0
    same = np.array_equal(sk.universal_set(), np.flatnonzero(exact >= eps))
    print(f"{n} single-key updates, d={d}, eps={eps}: {dt * 1e6:.1f} us/key; |U|={ids.size}; "
          f"max relative score error vs offline {rel:.2e}; set equal: {same}")
    if n <= 200_000:
        refd = ref.leverage_scores(K)
        print(f"  offline fast vs SVD reference: max abs diff {np.max(np.abs(exact - refd)):.2e}")


def stream_cases(d, n, seed=0):
    """Single-key streams that stress the rank-one path's refresh and band logic differently."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d))
    return {
        "norms growing 1% per key": g * (1.01 ** np.arange(n))[:, None],
        "norms growing 0.2% per key": g * (1.002 ** np.arange(n))[:, None],
        "heavy-tailed norms": g * rng.lognormal(0.0, 1.0, (n, 1)),
        "column scales 1..1e3 (kappa ~ 1e3)": g * np.logspace(0, 3, d),
    }


def streams(d, eps, prefill=1000, tokens=2000, repeats=3):
    for name, K in stream_cases(d, prefill + tokens).items():
        runs = []
        for _ in range(repeats):
            sk = sl.LevSketch(d, eps).update(K[:prefill])
            t = time.perf_counter()
            for i in range(prefill, prefill + tokens):
                sk.update(K[i])
            runs.append((time.perf_counter() - t) / tokens)
        print(f"  {name:36s} {np.median(runs) * 1e6:8.1f} us/key (median of {repeats}), {sk.num_retained} retained")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", type=int, default=0, help="run the drift check with this many single-key updates")
    ap.add_argument("--streams", action="store_true", help="per-key cost on four differently behaved streams")
    args = ap.parse_args(argv)
    print(environment())
    if args.long:
        long_run(args.long, args.d, args.eps)
        return
    if args.streams:
        sketch(keys(1100, args.d), 1000, args.eps)  # JIT warm-up
        streams(args.d, args.eps)
        return
    K = keys(args.prefill + args.tokens, args.d)
    sketch(K[: args.prefill + 64], args.prefill, args.eps)  # JIT warm-up (compiles or loads the numba cache)
    ratios, rows = [], []
    for _ in range(args.repeats):
        t_sk, sk, mean_r = sketch(K, args.prefill, args.eps)
        t_bl, ret, _ = baseline(K, args.prefill, args.eps)
        assert np.array_equal(sk.universal_set(), np.sort(ret)), "retained sets differ"
        ratios.append(t_bl / t_sk)
        rows.append((t_sk, t_bl, mean_r))
    t_sk, t_bl, mean_r = np.median(np.array(rows), axis=0)
    print(f"d={args.d} eps={args.eps} prefill={args.prefill} tokens={args.tokens}: mean retained {mean_r:.0f}")
    print(f"  sketch (Givens + Sherman-Morrison): {t_sk * 1e6:8.1f} us/key")
    print(f"  re-score from scratch (chol + trsm): {t_bl * 1e6:8.1f} us/key")
    print(f"  speedup: median {np.median(ratios):.1f}x (runs: {', '.join(f'{r:.1f}' for r in ratios)})")
    d, r = args.d, mean_r
    # flops per key: baseline Cholesky d^3/3 + triangular solves r d^2 + Gram update d^2;
    # sketch Givens sweep ~3 d^2 + back substitution d^2 + matrix-vector 2 r d
    f_bl, f_sk = d**3 / 3 + r * d * d + d * d, 4 * d * d + 2 * r * d
    print(f"  work ratio {f_bl / f_sk:.1f}x: baseline {f_bl / 1e6:.2f} Mflop/key at {f_bl / t_bl / 1e9:.1f} GFLOP/s, "
          f"sketch {f_sk / 1e3:.0f} kflop/key at {f_sk / t_sk / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
