"""Peak memory while streaming a large memory-mapped .npy of keys through the p=2 sketch.

Run:  python benchmarks/bench_memory.py [--n 10000000] [--d 64] [--path /tmp/streamlev_keys.npy]

Writes the file once (float32, chunk by chunk), then in a fresh process streams it
through LevSketch with streamlev.io.iter_npy_chunks and reports the growth of the
peak resident set (VmHWM) and of anonymous memory, and the same for a plain
np.load(mmap_mode="r") loop for comparison.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def write(path, n, d, chunk=1 << 20):
    if os.path.exists(path) and os.path.getsize(path) >= n * d * 4:
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(0)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s : s + m] = rng.standard_normal((m, d), dtype=np.float32) * rng.lognormal(0, 1, (m, 1)).astype(np.float32)
    out.flush()
    del out


def stream(path, eps, mode):
    import streamlev as sl
    from streamlev.io import iter_npy_chunks

    sk = sl.LevSketch(int(np.load(path, mmap_mode="r").shape[1]), eps)
    sk.update(np.zeros((1, sk.d)))  # warm up JIT and BLAS before measuring
    base_hwm, base_anon = status("VmHWM"), status("RssAnon")
    t = time.perf_counter()
    if mode == "iter":
        for start, block in iter_npy_chunks(path, 65536):
            sk.update(block, ids=np.arange(start, start + len(block)) + 1)
    else:
        arr = np.load(path, mmap_mode="r")
        for start in range(0, arr.shape[0], 65536):
            block = arr[start : start + 65536]
            sk.update(block, ids=np.arange(start, start + len(block)) + 1)
    dt = time.perf_counter() - t
    print(f"{mode:>6}: n={sk.n - 1} in {dt:.1f} s; peak RSS growth {(status('VmHWM') - base_hwm) / 2**20:.1f} MB, "
          f"anonymous memory growth {(status('RssAnon') - base_anon) / 2**20:.1f} MB; |U|={sk.num_retained}, "
          f"sketch nbytes {sk.nbytes / 2**20:.2f} MB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--path", default="/tmp/streamlev_keys.npy")
    ap.add_argument("--child", choices=["iter", "mmap"])
    args = ap.parse_args(argv)
    if args.child:
        stream(args.path, args.eps, args.child)
        return
    write(args.path, args.n, args.d)
    print(f"file {args.path}: {os.path.getsize(args.path) / 2**30:.2f} GiB")
    for mode in ("iter", "mmap"):
        subprocess.run([sys.executable, __file__, "--child", mode, "--path", args.path, "--eps", str(args.eps)],
                       check=True)


if __name__ == "__main__":
    main()
