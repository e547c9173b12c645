"""Per-token cost of keeping exact sketches for every KV head of a model, against the flop floor.

Run:  python benchmarks/bench_engine.py [--shapes smollm2,gemma3,32x32] [--eps 0.1] [--tokens 200]
      python benchmarks/bench_engine.py --torch-only      # the torch engine alone (e.g. on a CUDA machine)

For each model shape (sketches = layers x KV heads, key dimension d) the same float16-valued
keys (heavy-tailed norms, 2,048 prefill keys per sketch) are fed to:

* a per-sketch loop of ``LevSketch.update`` with one key (today's single-key API),
* ``MultiHeadSketch.update`` on (sketches, 1, d) blocks,
* ``DecodeEngine.update`` on (sketches, 1, d) blocks, keys stored as float16,
* ``TorchDecodeEngine.update`` (device: cuda if available, else cpu), keys stored as float16,

all on one CPU thread (BLAS limited to one thread; numba runs single-threaded). The flop floor is
``sum_s 4 d^2 + 2 r_s d`` per token (r_s: keys retained by sketch s) at this machine's
single-thread dgemv rate, measured in the same run on the same data volume (one gemv over all
sketches' retained keys stacked). The CPU methods must end with the same retained sets (checked).
Memory: bytes per sketch of the engine against the fp16 KV cache (keys and values) of the keys seen.
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


def per_token(fn, steps):
    t = time.perf_counter()
    for i in steps:
        fn(i)
    return (time.perf_counter() - t) / len(steps)


def dgemv_rate(S, r, d, repeats=20):
    """Single-thread dgemv rate (flop/s) over all sketches' retained keys stacked: (S*r, d) @ (d,)."""
    rng = np.random.default_rng(1)
    A = rng.standard_normal((max(1, int(S * r)), d))
    x = rng.standard_normal(d)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        A @ x
        ts.append(time.perf_counter() - t)
    return 2.0 * A.shape[0] * d / float(np.median(ts))


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
    t = time.perf_counter()
    for i in range(PREFILL + 4, PREFILL + tokens):
        eng.update(Kt[:, i], check_finite=False)
    sync()
    dt = (time.perf_counter() - t) / (tokens - 4)
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
    steps = range(PREFILL + 1, PREFILL + tokens)
    slow = range(PREFILL + 1, PREFILL + 1 + min(slow_tokens, tokens - 1))
    out["engine"] = per_token(lambda i: eng.update(K[:, i]), steps)
    r_mean = float((r0.mean() + eng.num_retained.mean()) / 2)
    out["multihead"] = per_token(lambda i: mh.update(K[:, i : i + 1]), slow)
    out["loop"] = per_token(lambda i: [singles[s].update(K[s, i]) for s in range(S)], slow)
    rest = range(slow[-1] + 1, PREFILL + tokens) if len(slow) else steps
    for i in rest:  # bring the slow methods to the same keys, then compare sets
        mh.update(K[:, i : i + 1])
        for s in range(S):
            singles[s].update(K[s, i])
    for s in range(S):
        U = eng.universal_set(sketch=s)
        assert np.array_equal(U, singles[s].universal_set()) and np.array_equal(U, mh.universal_set(s)), s
        if torch_device is not None:
            assert np.array_equal(U, teng.universal_set(sketch=s)), ("torch", s)
    out["floor_flops"] = S * (4 * d * d + 2 * r_mean * d)
    out["rate"] = dgemv_rate(S, r_mean, d)
    out["r"] = r_mean
    n = PREFILL + tokens
    out["bytes"] = eng.nbytes / S
    out["kv_fp16"] = n * d * 2 * 2  # keys and values (value width d) in fp16
    out["retained_fp16"] = float(eng.num_retained.mean()) * d * 2 * 2 + 8 * d * d
    out["levsketch_bytes"] = singles[0].nbytes
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,gemma3,32x32")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--slow-tokens", type=int, default=30, help="tokens timed for the per-sketch loop and MultiHead")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-only", action="store_true")
    args = ap.parse_args(argv)
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
            o = run_shape(name, args.eps, args.tokens, args.slow_tokens, device, args.torch_only)
            print(f"\n{o['shape']}, eps={args.eps}, {PREFILL} prefill keys:")
            if "torch" in o:
                print(f"  torch engine ({device}):      {o['torch'] * 1e3:9.3f} ms/token")
            if args.torch_only:
                continue
            floor = o["floor_flops"] / o["rate"]
            print(f"  mean retained r = {o['r']:.0f}; dgemv rate (1 thread, same data volume) "
                  f"{o['rate'] / 1e9:.1f} GFLOP/s; floor {floor * 1e3:.3f} ms/token")
            for key, label in (("loop", "LevSketch loop"), ("multihead", "MultiHeadSketch"),
                               ("engine", "DecodeEngine (fp16)"), ("torch", f"torch engine ({device})")):
                if key in o:
                    print(f"  {label:24s} {o[key] * 1e3:9.3f} ms/token  {o[key] / floor:6.2f}x floor  "
                          f"{o['loop'] / o[key]:7.1f}x faster than the loop")
            print(f"  memory per sketch: engine {o['bytes'] / 1e3:.1f} kB (LevSketch {o['levsketch_bytes'] / 1e3:.1f} kB); "
                  f"fp16 KV cache of the {PREFILL + args.tokens} keys {o['kv_fp16'] / 1e3:.1f} kB; "
                  f"fp16 retained keys+values + factor {o['retained_fp16'] / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
