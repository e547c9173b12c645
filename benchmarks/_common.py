"""Shared helpers for the benchmark scripts: timing medians, the machine's dgemm rate, environment."""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def dgemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """The machine's float64 matrix-multiply rate in flop/s (median of ``repeats``)."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((size, size))
    B = rng.standard_normal((size, size))
    return 2.0 * size**3 / median_time(lambda: A @ B, repeats)


def environment() -> str:
    """One line describing the machine, numpy and BLAS."""
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i.get('version', '')} {i.get('architecture', '')} "
                         f"x{i['num_threads']}" for i in threadpool_info() if i["user_api"] == "blas")
    except Exception:  # threadpoolctl is optional
        blas = "unknown BLAS"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, numpy {np.__version__}, "
            f"{blas}; load average {load:.2f}")
