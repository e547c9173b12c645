"""All heavy x^2 attention entries: sketch (build + query) vs brute force over the full attention matrix.

Both run in the same process, alternating, median of REPS repetitions each.
Brute force computes Q K^T in query blocks (float64 BLAS), squares, row-sums
and thresholds every entry; the sketch path builds a LevSketch over all keys
and calls ``heavy_attention``. Recall (and precision) of the sketch's entries
against brute force is checked and must be 100%.

Run: python benchmarks/bench_heavy.py [--n 65536] [--reps 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import streamlev as sl
from streamlev.datasets import load_minilm

BLOCK = 256  # queries per brute-force block: 256 x 65536 float64 = 128 MB


def brute_force(Q, K, eps):
    rows, cols = [], []
    for s in range(0, Q.shape[0], BLOCK):
        S = Q[s : s + BLOCK] @ K.T
        np.square(S, out=S)
        z = S.sum(axis=1, keepdims=True)
        r, c = np.nonzero(S >= eps * z)
        rows.append(r + s)
        cols.append(c)
    return np.concatenate(rows), np.concatenate(cols)


def sketch_path(Q, K, eps):
    sk = sl.LevSketch(K.shape[1], eps).update(K)
    A = sk.heavy_attention(Q)
    C = A.tocoo()
    return C.row.astype(np.int64), C.col.astype(np.int64), sk.num_retained


def compare(name, Q, K, eps, reps):
    t_sk, t_bf = [], []
    for _ in range(reps):
        t = time.perf_counter()
        r1, c1, kept = sketch_path(Q, K, eps)
        t_sk.append(time.perf_counter() - t)
        t = time.perf_counter()
        r2, c2 = brute_force(Q, K, eps)
        t_bf.append(time.perf_counter() - t)
    n = K.shape[0]
    got = set((r1 * n + c1).tolist())
    want = set((r2 * n + c2).tolist())
    recall = len(got & want) / max(1, len(want))
    precision = len(got & want) / max(1, len(got))
    ms, mb = float(np.median(t_sk)), float(np.median(t_bf))
    print(f"{name}: n_keys={n} n_queries={Q.shape[0]} d={K.shape[1]} eps={eps}: heavy entries={len(want)}, "
          f"retained keys={kept}; sketch {ms:.3f} s, brute force {mb:.3f} s (medians of {reps}), "
          f"speedup {mb / ms:.1f}x; recall {recall:.2%}, precision {precision:.2%}")
    assert recall == 1.0, "the sketch missed heavy entries"
    return mb / ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    # heavy-tailed key norms (lognormal, sigma 1.5) so that some keys dominate and heavy entries exist
    K = rng.standard_normal((a.n, a.d)) * np.exp(1.5 * rng.standard_normal((a.n, 1)))
    Q = rng.standard_normal((a.n, a.d))
    compare("synthetic heavy-tailed", Q, K, a.eps, a.reps)
    # real keys: MiniLM queries/keys of every layer and head, stacked per head (256 keys each, d = 32)
    s = load_minilm()
    ratios = []
    t_sk = t_bf = 0.0
    total = found = 0
    for layer in range(s.n_layers):
        for head in range(s.n_heads):
            Qh, Kh = s.q[layer, head], s.k[layer, head]
            ts, tb = [], []
            for _ in range(a.reps):
                t = time.perf_counter()
                r1, c1, _ = sketch_path(Qh, Kh, a.eps)
                ts.append(time.perf_counter() - t)
                t = time.perf_counter()
                r2, c2 = brute_force(Qh, Kh, a.eps)
                tb.append(time.perf_counter() - t)
            want = set((r2 * 256 + c2).tolist())
            got = set((r1 * 256 + c1).tolist())
            total += len(want)
            found += len(want & got)
            t_sk += float(np.median(ts))
            t_bf += float(np.median(tb))
    print(f"MiniLM (72 heads x 256 tokens, d=32, eps={a.eps}): heavy entries={total}, recall {found / total:.2%}; "
          f"sketch {t_sk:.3f} s, brute force {t_bf:.3f} s in total (speedup {t_bf / t_sk:.2f}x; with n=256 keys "
          "and up to d/eps retained there is little to skip)")
    assert found == total


if __name__ == "__main__":
    main()
