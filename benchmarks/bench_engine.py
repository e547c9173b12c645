"""Per-token cost of keeping exact sketches for every KV head of a model, against the flop floor.

Run:  python benchmarks/bench_engine.py [--shapes smollm2,gemma3,32x32] [--eps 0.1] [--tokens 300]
      python benchmarks/bench_engine.py --memory         # bytes per layer, one 32-head layer
      python benchmarks/bench_engine.py --torch-only      # the torch engine alone (e.g. on a CUDA machine)

For each model shape (sketches = layers x KV heads, key dimension d) the same float16-valued
keys (heavy-tailed norms, 2,048 prefill keys per sketch) are fed to:

* a per-sketch loop of ``LevSketch.update`` with one key (today's single-key API),
* ``MultiHeadSketch.update`` on (sketches, 1, d) blocks,
* ``DecodeEngine.update`` on (sketches, 1, d) blocks, keys stored as float16,
* ``TorchDecodeEngine.update`` (device: cuda if available, else cpu), keys stored as float16,

all on one CPU thread (BLAS limited to one thread; numba runs single-threaded), timed as thread
CPU time (robust to other load on the machine; equal to wall time when it is idle), each method
over consecutive tokens; the mean per token includes the amortized exact refreshes. The flop floor is ``sum_s 4 d^2 + 2 r_s d`` per token (r_s:
keys retained by sketch s) at this machine's single-thread dgemv rate measured in the same run:
one (r, d) gemv per sketch, and (strict) one gemv over all sketches' retained keys stacked. The CPU methods must end with the same retained sets (checked).
Memory: bytes per sketch of the engine against the fp16 KV cache (keys and values) of the keys seen;
``--memory`` measures one layer of 32 heads (d = 128, eps = 0.05, 2,348 tokens with fp16 values).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

import streamlev as sl  # noqa: E402
from streamlev.decode_engine import DecodeEngine  # noqa: E402

SHAPES = {"smollm2": (90, 64, "SmolLM2-135M: 30 layers x 3 KV heads"),
          "gemma3": (18, 256, "Gemma-3-270M: 18 layers x 1 KV head"),
          "32x32": (1024, 128, "32 layers x 32 KV heads")}
PREFILL = 2048


def keys(S, n, d, seed=0):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((S, n, d), dtype=np.float32) * rng.lognormal(0.0, 1.0, (S, n, 1)).astype(np.float32)
    return K.astype(np.float16).astype(np.float32)  # float16 values: every method sees the same stored keys


def cpu_timed(fn):
    """Thread CPU time of fn() (equals wall time on an idle machine; robust to other processes' load)."""
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def dgemv_rates(S, r, d, repeats=5):
    """Single-thread dgemv rates (flop/s), median of ``repeats``, thread CPU time.

    per_sketch: one numpy gemv of shape (r, d) per sketch, S distinct matrices (the gemv each
    sketch's work contains, numpy call overhead included); stacked: one gemv of shape (S*r, d)
    over the same data (the best BLAS-2 rate on it: a stricter floor).
    """
    rng = np.random.default_rng(1)
    r = max(1, int(round(r)))
    A = rng.standard_normal((S, r, d))
    x = rng.standard_normal(d)
    flops = 2.0 * S * r * d
    per = [flops / cpu_timed(lambda: [A[s] @ x for s in range(S)]) for _ in range(repeats)]
    B = A.reshape(S * r, d)
    stacked = [flops / cpu_timed(lambda: B @ x) for _ in range(repeats)]
    return float(np.median(per)), float(np.median(stacked))


def torch_engine(K, d, eps, tokens, device):
    import torch

    from streamlev.torch_engine import TorchDecodeEngine

    S = K.shape[0]
    Kt = torch.from_numpy(K).to(device=device, dtype=torch.float16)
    eng = TorchDecodeEngine(S, d, eps, dtype=torch.float16, device=device)
    for a in range(0, PREFILL, 256):
        eng.update(Kt[:, a : a + 256])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(PREFILL, PREFILL + 4):  # warm-up
        eng.update(Kt[:, i], check_finite=False)
    sync()
    clock = time.perf_counter if device.type == "cuda" else time.thread_time  # CPU: one intra-op thread
    t = clock()
    for i in range(PREFILL + 4, PREFILL + tokens):
        eng.update(Kt[:, i], check_finite=False)
    sync()
    dt = (clock() - t) / (tokens - 4)
    return dt, eng


def run_shape(name, eps, tokens, slow_tokens, torch_device, torch_only):
    S, d, label = SHAPES[name]
    K = keys(S, PREFILL + tokens, d)
    out = {"shape": f"{label} ({S} x d={d})"}
    if torch_device is not None:
        out["torch"], teng = torch_engine(K, d, eps, tokens, torch_device)
    if torch_only:
        return out
    mh = sl.MultiHeadSketch(S, d, eps)
    mh.update(K[:, :PREFILL])
    eng = DecodeEngine.from_sketches([mh.sketch(s) for s in range(S)], dtype="float16")
    eng.update(K[:, PREFILL])  # warm-up (numba cache)
    singles = [mh.sketch(s) for s in range(S)]
    mh.update(K[:, PREFILL])
    for s in range(S):
        singles[s].update(K[s, PREFILL])
    r0 = eng.num_retained.copy()
    # Each method over consecutive tokens (warm caches, as in a decode loop of this step alone); the
    # slow ones over the first slow_tokens, then fed the rest untimed so that all end on the same keys.
    out["engine"] = np.mean([cpu_timed(lambda: eng.update(K[:, i])) for i in range(PREFILL + 1, PREFILL + tokens)])
    slow = range(PREFILL + 1, PREFILL + tokens)
    out["multihead"] = np.mean([cpu_timed(lambda: mh.update(K[:, i : i + 1])) for i in slow[:slow_tokens]])
    out["loop"] = np.mean([cpu_timed(lambda: [singles[s].update(K[s, i]) for s in range(S)]) for i in slow[:slow_tokens]])
    for i in slow[slow_tokens:]:
        mh.update(K[:, i : i + 1])
        for s in range(S):
            singles[s].update(K[s, i])
    r_mean = float((r0.mean() + eng.num_retained.mean()) / 2)
    for s in range(S):
        U = eng.universal_set(head=s)
        assert np.array_equal(U, singles[s].universal_set()) and np.array_equal(U, mh.universal_set(head=s)), s
        if torch_device is not None:
            assert np.array_equal(U, teng.universal_set(head=s)), ("torch", s)
    out["floor_flops"] = S * (4 * d * d + 2 * r_mean * d)
    out["rate"], out["rate_stacked"] = dgemv_rates(S, r_mean, d)
    out["r"] = r_mean
    n = PREFILL + tokens
    out["bytes"] = eng.nbytes / S
    st = eng._st
    out["bytes_values"] = (eng.nbytes + st.KT.size * 2) / S  # the same engine holding fp16 values of width d
    out["in_use"] = 4 * d * (d + 1) + float(eng.num_retained.mean()) * (4 * d + 16)  # packed factor + fp16 key, value, id, score
    out["kv_fp16"] = n * d * 2 * 2  # keys and values (value width d) in fp16
    out["retained_fp16"] = float(eng.num_retained.mean()) * d * 2 * 2 + 8 * d * d
    out["levsketch_bytes"] = singles[0].nbytes
    return out


def memory(heads=32, d=128, eps=0.05, prefill=PREFILL, tokens=300):
    """One layer of the issue's example: bytes of MultiHeadSketch and DecodeEngine (fp16, values) vs the fp16 KV cache."""
    K = keys(heads, prefill + tokens, d).astype(np.float16)
    V = np.random.default_rng(2).standard_normal((heads, prefill + tokens, d)).astype(np.float16)
    mh = sl.MultiHeadSketch(heads, d, eps)
    eng = DecodeEngine(heads, d, eps, dtype="float16", value_dim=d)
    mh.update(K[:, :prefill], values=V[:, :prefill])
    eng.update(K[:, :prefill], values=V[:, :prefill])
    for i in range(prefill, prefill + tokens):
        mh.update(K[:, i : i + 1], values=V[:, i : i + 1])
        eng.update(K[:, i], values=V[:, i])
    assert all(np.array_equal(eng.universal_set(head=h), mh.universal_set(head=h)) for h in range(heads))
    r = float(eng.num_retained.mean())
    print(f"one layer: {heads} heads, d={d}, eps={eps}, {prefill + tokens} tokens with fp16 values; mean retained {r:.0f}")
    print(f"  MultiHeadSketch {mh.nbytes / 1e6:.1f} MB; DecodeEngine(fp16) {eng.nbytes / 1e6:.1f} MB "
          f"(in use {heads * (4 * d * (d + 1) + r * (4 * d + 16)) / 1e6:.1f} MB); fp16 KV cache "
          f"{heads * (prefill + tokens) * d * 4 / 1e6:.1f} MB; target (fp16 retained keys+values + factor) "
          f"{heads * (8 * d * d + r * 4 * d) / 1e6:.1f} MB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,gemma3,32x32")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--slow-tokens", type=int, default=None,
                    help="time the per-sketch loop and MultiHead on fewer tokens (default: all; fewer misses their refreshes)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-only", action="store_true")
    ap.add_argument("--memory", action="store_true", help="bytes per layer of the issue's 32-head example only")
    args = ap.parse_args(argv)
    if args.memory:
        print(environment())
        memory()
        return
    device = None
    if not args.no_torch:
        try:
            import torch

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
            print(f"torch {torch.__version__}, torch engine on {device} ({name})")
        except ImportError:
            print("torch not installed: no torch engine column")
    print(environment())
    with threadpool_limits(1, user_api="blas"):
        import torch as _t  # noqa: F401  (one intra-op thread for the CPU torch engine too)

        _t.set_num_threads(1)
        for name in args.shapes.split(","):
            o = run_shape(name, args.eps, args.tokens, args.slow_tokens or args.tokens, device, args.torch_only)
            print(f"\n{o['shape']}, eps={args.eps}, {PREFILL} prefill keys:")
            if "torch" in o:
                print(f"  torch engine ({device}):      {o['torch'] * 1e3:9.3f} ms/token")
            if args.torch_only:
                continue
            floor = o["floor_flops"] / o["rate"]
            strict = o["floor_flops"] / o["rate_stacked"]
            print(f"  mean retained r = {o['r']:.0f}; single-thread dgemv {o['rate'] / 1e9:.1f} GFLOP/s per sketch-shaped "
                  f"gemv ({o['rate_stacked'] / 1e9:.1f} stacked): floor {floor * 1e3:.3f} ms/token "
                  f"(strict {strict * 1e3:.3f})")
            for key, label in (("loop", "LevSketch loop"), ("multihead", "MultiHeadSketch"),
                               ("engine", "DecodeEngine (fp16)"), ("torch", f"torch engine ({device})")):
                if key in o:
                    print(f"  {label:24s} {o[key] * 1e3:9.3f} ms/token  {o[key] / floor:6.2f}x floor "
                          f"({o[key] / strict:5.2f}x strict)  {o['loop'] / o[key]:7.1f}x faster than the loop")
            print(f"  memory per sketch: engine {o['bytes'] / 1e3:.1f} kB for keys only, {o['bytes_values'] / 1e3:.1f} kB "
                  f"with fp16 values ({o['in_use'] / 1e3:.1f} kB in use); LevSketch {o['levsketch_bytes'] / 1e3:.1f} kB; "
                  f"target (fp16 retained keys+values + factor) {o['retained_fp16'] / 1e3:.1f} kB; "
                  f"fp16 KV cache of the {PREFILL + args.tokens} keys {o['kv_fp16'] / 1e3:.1f} kB")

if __name__ == "__main__":
    main()
