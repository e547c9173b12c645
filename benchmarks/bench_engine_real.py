#!/usr/bin/env python3
"""Per-token decode cost on *real* keys: DecodeEngine against a loop of LevSketch single-key updates.

Random keys (``bench_engine.py``) are full rank and well conditioned; real ones are not. Gemma 3's keys,
for example, have coordinates that are exactly zero in every key (4-8 of 256 on 3 of the 7 stored
layers), which makes K^T K singular. This script feeds the keys of the first key/value head of every
stored layer of an archive written by ``examples/extract_gemma3_keys.py`` (or any ``load_qkv`` archive):
``--prefill`` keys as one block, then ``--tokens`` single tokens, and reports the median of
``--repeats`` runs and whether both end on the same universal sets.

Usage::

    python benchmarks/bench_engine_real.py --data DIR/gemma3_qkv.npz [--eps 0.1] [--repeats 3] [--torch cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlev as sl  # noqa: E402
from streamlev.datasets import load_qkv  # noqa: E402


def run(K, eps, prefill, tokens):
    S, _, d = K.shape
    eng = sl.DecodeEngine(S, d, eps, dtype="float32")
    eng.update(K[:, :prefill])
    eng.update(K[:, prefill])  # loads the compiled kernel outside the timing
    t0 = time.perf_counter()
    for j in range(prefill + 1, prefill + tokens):
        eng.update(K[:, j])
    t_eng = (time.perf_counter() - t0) / (tokens - 1)
    sks = [sl.LevSketch(d, eps=eps).update(K[s, : prefill + 1].astype(np.float64)) for s in range(S)]
    t0 = time.perf_counter()
    for j in range(prefill + 1, prefill + tokens):
        for s in range(S):
            sks[s].update(K[s, j].astype(np.float64))
    t_loop = (time.perf_counter() - t0) / (tokens - 1)
    same = all(np.array_equal(eng.universal_set(head=s), sks[s].universal_set()) for s in range(S))
    return t_eng, t_loop, same


def run_torch(K, eps, prefill, tokens, device):
    import torch

    from streamlev.torch_engine import TorchDecodeEngine

    S, _, d = K.shape
    Kt = torch.from_numpy(K).to(device)
    eng = TorchDecodeEngine(S, d, eps, device=device)
    eng.update(Kt[:, :prefill])
    eng.update(Kt[:, prefill])
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for j in range(prefill + 1, prefill + tokens):
        eng.update(Kt[:, j], check_finite=False)
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (tokens - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a load_qkv archive (e.g. gemma3_qkv.npz)")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch", default=None, metavar="DEVICE", help="also time TorchDecodeEngine on DEVICE (cpu, cuda)")
    a = ap.parse_args(argv)
    s = load_qkv(a.data, dtype=np.float32)
    n = a.prefill + a.tokens
    K = np.ascontiguousarray(np.stack([np.asarray(s.k[li, 0, :n], np.float32) for li in range(s.k.shape[0])]))
    S, _, d = K.shape
    dead = [int((np.abs(K[i]).max(axis=0) == 0).sum()) for i in range(S)]
    print(f"{a.data}: {S} layers x d={d}, eps={a.eps}; coordinates zero in every key, per layer: {dead}")
    res = [run(K, a.eps, a.prefill, a.tokens) for _ in range(a.repeats)]
    te = statistics.median(r[0] for r in res) * 1e3
    tl = statistics.median(r[1] for r in res) * 1e3
    print(f"  DecodeEngine (float32)   {te:.3f} ms/token")
    print(f"  LevSketch loop           {tl:.3f} ms/token   ({tl / te:.2f}x the engine)")
    print(f"  same universal sets: {all(r[2] for r in res)}")
    if a.torch:
        tt = statistics.median(run_torch(K, a.eps, a.prefill, a.tokens, a.torch) for _ in range(a.repeats)) * 1e3
        print(f"  TorchDecodeEngine ({a.torch})  {tt:.3f} ms/token")


if __name__ == "__main__":
    main()
