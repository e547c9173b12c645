"""Regenerate the figures in ``docs/figures/`` from the real MiniLM keys shipped with streamlev.

    python docs/make_figures.py           # needs matplotlib; about ten seconds

Writes

* ``figures/leverage_real_heads.png``: leverage scores of the 72 real heads
  (sorted), and |U| against eps next to the a-priori bound floor(d/eps);
* ``figures/budget_recall.png``: for a budget of b keys chosen by leverage, by
  key norm or at random, the recall of heavy |x|^2 attention entries and the
  softmax attention mass captured (mean over heads);

and prints the numbers quoted in ``docs/guide.md``. Everything is exact
(streamlev.reference, SVD) and deterministic: the random baseline is drawn as
its exact expectation b/n.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the source tree this script belongs to

from streamlev import reference as ref  # noqa: E402
from streamlev.datasets import load_minilm  # noqa: E402

EPS = 0.1
EPS_GRID = np.geomspace(0.02, 0.6, 40)


def softmax_mass_per_key(Q, K):
    """Mean over the real queries of the softmax attention each key receives (scale 1/sqrt(d))."""
    S = (Q @ K.T) / math.sqrt(K.shape[1])
    S -= S.max(axis=1, keepdims=True)
    P = np.exp(S)
    P /= P.sum(axis=1, keepdims=True)
    return P.mean(axis=0)


def per_head(s):
    out = []
    for L in range(s.n_layers):
        for H in range(s.n_heads):
            K, Q = s.k[L, H], s.q[L, H]
            tau = ref.leverage_scores(K)
            thr = EPS * (1 + 1e-9)
            heavy = (ref.attention_x2(Q, K) >= thr).sum(axis=0) + \
                (ref.attention_x2(ref.worst_case_queries(K), K) >= thr).sum(axis=0)
            out.append({"tau": tau, "heavy": heavy, "mass": softmax_mass_per_key(Q, K),
                        "norm": np.linalg.norm(K, axis=1)})
    return out


def curve(weights, order):
    c = np.cumsum(weights[order])
    return c / c[-1] if c[-1] > 0 else c


def main() -> int:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    s = load_minilm()
    heads = per_head(s)
    n, d = s.n_tokens, s.head_dim
    b = np.arange(1, n + 1)
    taus = np.array([h["tau"] for h in heads])

    # ---- figure 1: leverage distribution and |U| vs eps
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for t in taus:
        ax1.plot(b, np.sort(t)[::-1], color="C0", alpha=0.25, lw=0.8)
    ax1.axhline(d / n, color="k", ls=":", lw=1, label=f"mean leverage d/n = {d / n:.3f}")
    ax1.axhline(EPS, color="C3", ls="--", lw=1, label=f"eps = {EPS}")
    ax1.set(xlabel="keys, sorted by leverage", ylabel="leverage tau_j = max |x|^2 share",
            title=f"Leverage of {len(heads)} real heads (n={n}, d={d})")
    ax1.legend()
    sizes = np.array([[int((t >= e).sum()) for e in EPS_GRID] for t in taus])
    ax2.fill_between(EPS_GRID, sizes.min(0), sizes.max(0), color="C0", alpha=0.25, label="|U|, min-max over heads")
    ax2.plot(EPS_GRID, np.median(sizes, 0), color="C0", label="|U|, median")
    ax2.plot(EPS_GRID, np.minimum(n, np.floor(d / EPS_GRID)), color="C3", ls="--", label="bound min(n, floor(d/eps))")
    ax2.axvline(d / n, color="k", ls=":", lw=1, label="eps = d/n")
    ax2.set(xscale="log", yscale="log", xlabel="eps", ylabel="keys kept", title="Universal set size vs eps")
    ticks = [0.02, 0.05, 0.1, 0.2, 0.5]
    ax2.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
    ax2.set_xticks([], minor=True)  # the default minor labels of a short log axis overlap
    ax2.legend(fontsize=8)
    fig.suptitle(f"{s.model}, {n} tokens of {s.text_source}", fontsize=9)
    fig.savefig(HERE / "figures" / "leverage_real_heads.png")

    # ---- figure 2: recall of heavy |x|^2 entries and softmax mass vs budget
    rec = {"leverage": [], "norm": []}
    mass = {"leverage": [], "norm": []}
    for h in heads:
        for name, score in (("leverage", h["tau"]), ("norm", h["norm"])):
            order = np.argsort(-score, kind="stable")
            rec[name].append(curve(h["heavy"], order))
            mass[name].append(np.cumsum(h["mass"][order]))
    u_sizes = np.array([int((h["tau"] >= EPS).sum()) for h in heads])
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for ax, data, title, ylabel in (
            (ax1, rec, f"Heavy |x|^2 entries (A_ij >= {EPS}) covered", "recall (real + worst-case queries)"),
            (ax2, mass, "Softmax mass captured (no guarantee)", "mean softmax mass of the kept keys")):
        ax.plot(b, np.mean(data["leverage"], 0), color="C0", label="top-b by leverage")
        ax.plot(b, np.mean(data["norm"], 0), color="C1", label="top-b by key norm")
        ax.plot(b, b / n, color="C7", ls="--", label="random b keys (expectation b/n)")
        ax.axvline(np.median(u_sizes), color="C3", ls=":", lw=1, label=f"median |U| at eps={EPS}")
        ax.set(xlabel="budget b (keys kept)", ylabel=ylabel, title=title, ylim=(0, 1.02), xlim=(0, n))
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Mean over {len(heads)} heads of {s.model}", fontsize=9)
    fig.savefig(HERE / "figures" / "budget_recall.png")

    # ---- numbers quoted in the guide
    lev_rec, nrm_rec = np.mean(rec["leverage"], 0), np.mean(rec["norm"], 0)
    lev_m, nrm_m = np.mean(mass["leverage"], 0), np.mean(mass["norm"], 0)
    print(f"{len(heads)} heads, n={n}, d={d}; sum of leverage per head: {taus.sum(1).min():.6f}..{taus.sum(1).max():.6f}")
    for e in (0.05, 0.1, d / n, 0.2, 0.3):
        c = (taus >= e).sum(1)
        print(f"eps={e:.4f}: |U| median {np.median(c):g} (min {c.min()}, max {c.max()}), "
              f"{100 * np.median(c) / n:.0f}% of keys, bound {min(n, math.floor(d / e))}")
    for bb in (32, 64, 128, int(np.median(u_sizes))):
        print(f"budget {bb:>3}: heavy-entry recall leverage {lev_rec[bb - 1]:.3f} norm {nrm_rec[bb - 1]:.3f} "
              f"random {bb / n:.3f}; softmax mass leverage {lev_m[bb - 1]:.3f} norm {nrm_m[bb - 1]:.3f} "
              f"random {bb / n:.3f}")
    print("wrote", HERE / "figures" / "leverage_real_heads.png", "and", HERE / "figures" / "budget_recall.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
