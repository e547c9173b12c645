"""MultiHeadSketch (a loop of per-head LevSketches) against a vectorized lower bound, side by side.

The vectorized "lower bound" does only the unavoidable batched numpy work of
one stacked state (no pruning bookkeeping, no condition checks, no ridge):
prefill: batched Gram update + batched Cholesky + batched solve for the new
rows' scores; decode: batched Sherman-Morrison on stacked inverses + score
downdate of a padded retained set. If the loop is within 2x of it, the loop
(exact, with every head's own stable update path) is kept.

Run: python benchmarks/bench_multihead.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time  # noqa: E402

from streamlev.multihead import MultiHeadSketch  # noqa: E402

HEADS, D, EPS = 12, 64, 0.05
PREFILL_M, PREFILL_BLOCKS, DECODE_STEPS, REPS = 2048, 4, 256, 5


def vec_prefill(blocks):
    G = np.zeros((HEADS, D, D))
    for B in blocks:
        G += np.matmul(B.transpose(0, 2, 1), B)
        L = np.linalg.cholesky(G)
        Y = np.linalg.solve(L, B.transpose(0, 2, 1))  # (h, d, m)
        tau = np.einsum("hdm,hdm->hm", Y, Y)
        _ = tau >= EPS
    return G


def vec_decode(Minv, Kret, tau, steps):
    for x in steps:  # x: (h, d)
        u = np.einsum("hij,hj->hi", Minv, x)
        hh = np.einsum("hi,hi->h", x, u)
        Minv -= np.einsum("hi,hj->hij", u, u) / (1 + hh)[:, None, None]
        c = np.einsum("hrd,hd->hr", Kret, u)
        tau -= c * c / (1 + hh)[:, None]
        _ = tau >= EPS


def med(fn):
    return median_time(fn, REPS, warmup=0)


def main():
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((HEADS, PREFILL_M, D)) * np.exp(rng.standard_normal((HEADS, PREFILL_M, 1)))
              for _ in range(PREFILL_BLOCKS)]
    steps = rng.standard_normal((DECODE_STEPS, HEADS, D))

    def loop_prefill():
        mh = MultiHeadSketch(HEADS, D, EPS)
        for B in blocks:
            mh.update(B)
        return mh

    base = loop_prefill()
    t_loop = med(loop_prefill)
    t_vec = med(lambda: vec_prefill(blocks))
    print(f"prefill {PREFILL_BLOCKS} x (heads={HEADS}, m={PREFILL_M}, d={D}): loop {t_loop * 1e3:.1f} ms, "
          f"vectorized lower bound {t_vec * 1e3:.1f} ms, ratio {t_loop / t_vec:.2f}x")

    def loop_decode():
        mh = base.copy()
        for x in steps:
            mh.update(x)

    G = vec_prefill(blocks)
    Minv0 = np.linalg.inv(G)
    r = int(base.num_retained.max())
    Kret0 = rng.standard_normal((HEADS, r, D))
    tau0 = np.ones((HEADS, r))
    t_copy = med(lambda: base.copy())
    t_loop = med(loop_decode) - t_copy
    t_vec = med(lambda: vec_decode(Minv0.copy(), Kret0, tau0.copy(), steps))
    print(f"decode {DECODE_STEPS} steps of (heads={HEADS}, d={D}), retained up to {r}: loop "
          f"{t_loop / DECODE_STEPS * 1e6:.0f} us/step, vectorized lower bound {t_vec / DECODE_STEPS * 1e6:.0f} us/step, "
          f"ratio {t_loop / t_vec:.2f}x")


if __name__ == "__main__":
    main()
