"""General-p sketch cost against the p=2 sketch on the same keys (issue #4 target: p=1 within 10x).

Run:  python benchmarks/bench_lp.py [--n 65536] [--d 64] [--eps 0.1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_time  # noqa: E402

import streamlev as sl  # noqa: E402

BLOCK = 4096


def run(cls, K, eps, **kw):
    sk = cls(K.shape[1], eps, **kw)
    for s in range(0, K.shape[0], BLOCK):
        sk.update(K[s : s + BLOCK])
    return sk


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(environment())
    rng = np.random.default_rng(0)
    K = (rng.standard_normal((args.n, args.d)) * rng.lognormal(0, 1, (args.n, 1))).astype(np.float32)
    t2 = median_time(lambda: run(sl.LevSketch, K, args.eps), args.repeats)
    print(f"n={args.n} d={args.d} eps={args.eps} blocks of {BLOCK}")
    print(f"  p=2 LevSketch: {t2:.3f} s, |U|={run(sl.LevSketch, K, args.eps).num_retained}")
    for p in (1.0, 3.0):
        tp = median_time(lambda: run(sl.LpSketch, K, args.eps, p=p), args.repeats)
        sk = run(sl.LpSketch, K, args.eps, p=p)
        print(f"  p={p:g} LpSketch: {tp:.3f} s ({tp / t2:.1f}x the p=2 time), |U|={sk.num_retained} "
              f"(bound {sl.LpSketch.max_retained(args.d, args.eps, p)})")


if __name__ == "__main__":
    main()
