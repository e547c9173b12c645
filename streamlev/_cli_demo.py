"""``streamlev demo``: one long stream of real attention keys, bounded memory, checked against brute force.

The stream is every key of the MiniLM sample shipped with the package
(:func:`streamlev.datasets.load_minilm`: 6 layers x 12 heads x 256 tokens,
head dimension 32), layer by layer and head by head: 18,432 keys, 72 times
one head's keys. That is longer than the a-priori bound ``floor(d/eps)`` for
the default eps, which is the regime where a sketch pays off; the demo says
so, and also shows the per-head case (n = 256 < d/eps), where it does not.
The universal set is over all keys of the stream at once (as if one head saw
them all), which is a test of the method, not one head's attention.
"""

from __future__ import annotations

import importlib.util
import math
import time

import numpy as np

from . import reference as ref
from .datasets import load_minilm
from .sketch import LevSketch

__all__ = ["DEFAULT_EPS", "run", "have_matplotlib"]

DEFAULT_EPS = 0.01
BLOCK = 1024  # prefill block size
DECODE = 2048  # keys at the end of the stream fed one at a time
ROWS = 6  # checkpoints printed
CHECK_QUERIES = 2048  # real queries and worst-case queries in the brute-force check
_HEAVY_RTOL = 1e-9  # A >= eps * (1 + 1e-9) counts as heavy: ties at eps are rounding noise
_TOL = 1e-9  # accuracy band around eps inside which set membership may differ from the SVD reference


def have_matplotlib() -> bool:
    """True when matplotlib can be imported (the plot is optional)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # e.g. a broken install, or sys.modules["matplotlib"] = None
        return False


def _warm_up() -> float:
    """Load (or compile) the numba kernels of both update paths, so that no timing below includes it."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    sk = LevSketch(4, 0.5).update(rng.standard_normal((16, 4)))
    for key in rng.standard_normal((4, 4)):
        sk.update(key, return_changes=True)
    return time.perf_counter() - t0


def _stream(K, eps):
    """Feed K (prefill blocks, then one key at a time); return checkpoint rows, curves and decode statistics."""
    n = K.shape[0]
    n_decode = DECODE if n >= 4 * DECODE else n // 4
    n_prefill = n - n_decode
    marks = set(np.linspace(0, n, ROWS + 1).astype(int)[1:].tolist())
    sk = LevSketch(K.shape[1], eps)
    rows, curve = [], []
    elapsed = peak = 0.0
    entered = evicted = 0
    t_decode = 0.0

    def record(seen):
        nonlocal elapsed, peak
        t0 = time.perf_counter()
        u = sk.universal_set().size
        elapsed += time.perf_counter() - t0
        peak = max(peak, sk.nbytes)
        curve.append((seen, sk.nbytes, u))
        if seen in marks:
            rows.append((seen, seen * K.shape[1] * 8, sk.nbytes, u, elapsed))

    for s in range(0, n_prefill, BLOCK):
        t = min(n_prefill, s + BLOCK)
        t0 = time.perf_counter()
        sk.update(K[s:t])
        elapsed += time.perf_counter() - t0
        for m in sorted(x for x in marks if s < x < t):  # a checkpoint inside this block: record at its end
            marks.discard(m)
            marks.add(t)
        record(t)
    for j in range(n_prefill, n):
        t0 = time.perf_counter()
        ch = sk.update(K[j], return_changes=True)
        dt = time.perf_counter() - t0
        elapsed += dt
        t_decode += dt
        entered += ch.added.size
        evicted += ch.evicted.size
        if (j + 1) in marks or (j + 1 - n_prefill) % 128 == 0:
            record(j + 1)
    return sk, rows, curve, peak, {"n": n_decode, "seconds": t_decode, "entered": entered, "evicted": evicted}


def _brute_force(K, Q, U, eps, rng):
    """|x|^2 attention of real queries and of worst-case queries (all of U and a sample of other keys)."""
    n = K.shape[0]
    in_u = np.zeros(n, dtype=bool)
    in_u[U] = True
    real = Q[rng.choice(Q.shape[0], size=min(CHECK_QUERIES, Q.shape[0]), replace=False)]
    others = np.flatnonzero(~in_u)
    probe = np.concatenate([U, rng.choice(others, size=min(others.size, max(0, CHECK_QUERIES - U.size)),
                                          replace=False)])
    worst = ref.worst_case_queries(K)[probe]
    thr = eps * (1 + _HEAVY_RTOL)
    heavy = {"real": 0, "worst": 0}
    keys = np.zeros(n, dtype=bool)
    for name, queries in (("real", real), ("worst", worst)):
        for s in range(0, queries.shape[0], 256):  # 256 x n shares at a time: bounded memory
            hit = ref.attention_x2(queries[s : s + 256], K) >= thr
            heavy[name] += int(hit.sum())
            keys |= hit.any(axis=0)
    return {"real_queries": real.shape[0], "worst_queries": probe.size, "heavy_real": heavy["real"],
            "heavy_worst": heavy["worst"], "missed": np.flatnonzero(keys & ~in_u)}


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def run(eps: float = DEFAULT_EPS, layers=None, plot: str | None = None, quiet: bool = False) -> bool:
    """Run the demo, print its report; return True when every check passed.

    Parameters
    ----------
    eps : float
        Attention share threshold.
    layers : list of int, optional
        Layers whose keys form the stream (default all).
    plot : str, optional
        Write a two-panel figure here (needs matplotlib).
    quiet : bool
        Print the result lines only.

    Raises
    ------
    ValueError
        For layers outside the sample.
    """
    s = load_minilm()
    layers = list(range(s.n_layers)) if layers is None else sorted(set(layers))
    if not layers or any(not 0 <= L < s.n_layers for L in layers):
        raise ValueError(f"--layers must be in 0..{s.n_layers - 1}, got {layers}")
    out = (lambda *a, **k: None) if quiet else print
    d = s.head_dim
    K = np.ascontiguousarray(s.k[layers].reshape(-1, d))  # layer by layer, head by head, token by token
    Q = s.q[layers].reshape(-1, d)
    n = K.shape[0]
    bound = LevSketch.max_retained(d, eps)
    compile_s = _warm_up()

    out("streamlev demo: the attention keys that can ever matter, kept in one pass in bounded memory.")
    out(f"Stream: {_fmt(n)} real keys of dimension d = {d}, every key of {len(layers)} layer(s) x {s.n_heads} heads "
        f"x {s.n_tokens} tokens")
    out(f"  of {s.model} on one passage (streamlev/data/PROVENANCE.md),")
    out(f"  layer by layer, head by head: U is over all {len(layers) * s.n_heads} heads' keys at once "
        "(a test stream, not one head's attention).")
    out(f"Kept: every key that some query can give |x|^2 attention share >= eps = {eps:g};")
    out(f"  at most floor(d/eps) = {_fmt(bound)} keys, a bound known before any data.")
    sk, rows, curve, peak, dec = _stream(K, eps)
    U = sk.universal_set()
    out(f"  Keys 1..{_fmt(n - dec['n'])} arrive in blocks of {BLOCK} (prefill), the last {_fmt(dec['n'])} one at a "
        "time (decode).")
    out("")
    out(f"{'keys seen':>10} {'keys KiB':>10} {'sketch KiB':>11} {'|U|':>7} {'time ms':>8}")
    for seen, kb, sb, u, t in rows:
        out(f"{_fmt(seen):>10} {_fmt(kb / 1024):>10} {_fmt(sb / 1024):>11} {_fmt(u):>7} {1e3 * t:>8.1f}")
    out("  keys seen: stream position. keys KiB: every key seen so far as float64 (what an offline computation holds).")
    out("  sketch KiB: LevSketch.nbytes (the d x d factor and the retained keys, with spare capacity).")
    out("  |U|: keys that can still get share >= eps (a key's leverage only falls as keys arrive).")
    out("  time ms: cumulative, in update() and universal_set(); the numba kernels were loaded or compiled")
    out(f"  before the clock started ({1e3 * compile_s:.0f} ms, not counted).")
    out("")

    tau = ref.leverage_scores(K)
    in_u = np.zeros(n, dtype=bool)
    in_u[U] = True
    mismatch = np.flatnonzero((in_u != (tau >= eps)) & (np.abs(tau - eps) > _TOL))
    bf = _brute_force(K, Q, U, eps, np.random.default_rng(0))
    per_head = np.array([int((ref.leverage_scores(s.k[L, H]) >= eps).sum()) for L in layers
                         for H in range(s.n_heads)])
    where = _where(U, layers, s)
    ok = mismatch.size == 0 and bf["missed"].size == 0 and U.size <= bound

    print(f"Result: |U| = {_fmt(U.size)} of {_fmt(n)} keys{where}; the sketch held at most {_fmt(peak / 1024)} KiB "
          f"while the keys grew to {_fmt(n * d * 8 / 1024)} KiB (a stream {n / bound:.1f} times d/eps).")
    print(f"Decode: {1e6 * dec['seconds'] / max(1, dec['n']):.0f} us per key over the last {_fmt(dec['n'])} keys "
          f"(update(key, return_changes=True): {dec['entered']} entered U, {_fmt(dec['evicted'])} left it).")
    print(f"Check: U equals the exact offline set {{j : tau_j >= {eps:g}}} (SVD of all keys, streamlev.reference): "
          + ("yes." if mismatch.size == 0 else f"FAILED on {mismatch.size} keys, e.g. {mismatch[:5].tolist()}."))
    print(f"Check: brute-force |x|^2 attention of {_fmt(bf['real_queries'])} real queries and of the worst-case "
          f"query of {_fmt(bf['worst_queries'])} keys (all of U among them): "
          f"{_fmt(bf['heavy_real'] + bf['heavy_worst'])} shares >= {eps:g} "
          f"({bf['heavy_real']} from real queries), "
          + ("all on keys in U." if bf["missed"].size == 0 else
             f"FAILED: {bf['missed'].size} keys with such a share are not in U."))
    print(f"Limit: one head alone has n = {s.n_tokens} keys, {'fewer' if s.n_tokens < bound else 'not many more'} "
          f"than d/eps = {_fmt(bound)}; there U keeps a median {np.median(per_head):g} of {s.n_tokens} keys "
          f"(min {per_head.min()}, max {per_head.max()}, {per_head.size} heads): a sketch pays off when the stream is "
          "much longer than d/eps.")
    print("Softmax has no universal set (the query t * k_j makes key j heavy as t grows): the guarantee is for |x|^2 "
          "attention; for softmax caches see docs/softmax_selectors.md.")
    if plot:
        _plot(curve, bound, eps, d, plot, s.model)
        print(f"plot written to {plot}")
    return ok


def _where(U, layers, s) -> str:
    if U.size == 0:
        return ""
    per = s.n_heads * s.n_tokens
    heads = [(layers[i // per], (i % per) // s.n_tokens) for i in U.tolist()]
    names, counts = np.unique([f"L{L}H{H}" for L, H in heads], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:3]
    more = "" if names.size <= 3 else f", {names.size - 3} more heads"
    return " (from " + ", ".join(f"{names[i]}: {counts[i]}" for i in order) + more + ")"


def _plot(curve, bound, eps, d, path, model):
    from matplotlib.figure import Figure  # optional dependency; no pyplot: no global state, no GUI backend

    seen, nbytes, u = (np.array(c, dtype=float) for c in zip(*curve))
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(seen, seen * d * 8 / 1024, color="C7", label="all keys seen (float64)")
    ax1.plot(seen, nbytes / 1024, color="C0", label="LevSketch.nbytes")
    ax1.set_xlabel("keys seen")
    ax1.set_ylabel("KiB")
    ax1.set_title("Memory")
    ax1.legend()
    ax2.plot(seen, u, color="C0", label="|U| (keys with leverage >= eps)")
    ax2.axhline(bound, color="C3", ls="--", lw=1, label=f"bound floor(d/eps) = {bound}")
    ax2.set_xlabel("keys seen")
    ax2.set_ylabel("keys")
    ax2.set_title(f"Universal set, eps = {eps:g}")
    ax2.set_ylim(0, math.ceil(1.1 * bound))
    ax2.legend()
    fig.suptitle(f"streamlev demo: real keys of {model}", fontsize=10)
    fig.savefig(path)
