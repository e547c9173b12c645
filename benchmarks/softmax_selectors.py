#!/usr/bin/env python3
"""Captured softmax mass of key selectors on real heads: key-only and query-statistics classes.

Protocol (per head and document of n tokens):

* decoder (SmolLM2, causal; ``n0 = floor(3n/4)``): the cache is the prefix
  ``K[:n0]`` (prefill compression); the *summary* sees the queries at
  positions ``< n0`` (a :class:`~streamlev.query_sketch.QuerySketch`, or a
  peer's own statistic of them); the *evaluation* queries are the positions
  ``>= n0``, each with its softmax over the prefix;
* encoder (MiniLM, bidirectional): the cache is all n keys; the evaluation
  queries are the positions ``i % 4 == 3`` and the summary sees the others (an
  interleaved split: a split by position would let "recent" keys coincide
  with the evaluation queries' own positions, which a bidirectional model
  attends to strongly);
* key-only selectors see keys only; nothing but the oracle sees an evaluation query;
* budgets ``B = N/16, N/8, N/4`` of the cache size N; metric ``mass`` = mean
  over evaluation queries of the softmax share of the kept keys (the
  definition of ``streamlev.eval.head_metrics``'s ``mass``, computed here from
  the column means of the attention so that dozens of kept sets per head cost
  nothing; the script checks it equals ``head_metrics`` on one head);
* the oracle keeps the top-B column means: the best fixed set for these
  evaluation queries (exactly optimal, the objective is additive over keys).

Reported: mean mass over heads x documents, and its share of the oracle
(ratio of means). Baseline scores (``keydiff``, ``knorm_*``,
``sketch_leverage``, ``leverage``, ``random``, ``streaming_llm``) come from
``streamlev.eval.key_scores``. The peers' rules are replicated from their code
(kvpress ``ExpectedAttentionPress`` @8bb29b9 and SnapKV ``SnapKVCluster``
@e216ddc), not imported (neither installs offline as used here).

Usage::

    python benchmarks/softmax_selectors.py                         # embedded MiniLM sample only
    python examples/extract_keys.py --out /tmp/minilm6.npz --texts 6 --max-tokens 512 --dtype float32
    HF_HUB_OFFLINE=1 python examples/extract_decoder_keys.py --out /tmp/smollm2_qkv.npz --docs 3
    python benchmarks/softmax_selectors.py --minilm /tmp/minilm6.npz --decoder /tmp/smollm2_qkv.npz \\
        --json docs/softmax_selectors.json --figures docs/figures
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import _oracle_plot as oracle_plot
import numpy as np

from streamlev.datasets import load_minilm, load_qkv
from streamlev.query_sketch import QuerySketch
from streamlev.selectors import (SINKS, budget_split, expected_logit_scores, query_span_leverage, rope_rotations, select,
                                 shift_invariant_leverage)

FRACS = (1 / 16, 1 / 8, 1 / 4)
BASELINES = ("random", "knorm_large", "knorm_small", "keydiff", "sketch_leverage", "leverage", "streaming_llm")


# ----------------------------------------------------------------------------- peers (replicated rules)
def eap_scores(K, V, Qpre, n_sink=4, rope_theta=None, q_len=None, n_future=512):
    """kvpress ExpectedAttentionPress.score (defaults: n_sink=4, n_future_positions=512, covariance, vnorm).

    Query mean/covariance of the pre-RoPE queries after the first n_sink, rotated by the RoPE matrix averaged
    over positions q_len .. q_len+n_future-1 (identity for a model without RoPE); scores
    softmax(K mu / sqrt(d) + diag(K Sigma K^T) / (2d)) * ||v||; sinks padded with max + 1.
    """
    n, d = K.shape
    Qs = Qpre[n_sink:]
    mu = Qs.mean(0)
    C = (Qs - mu).T @ (Qs - mu) / Qs.shape[0]
    if rope_theta is not None:
        inv = 1.0 / rope_theta ** (np.arange(0, d, 2) / d)
        ang = np.outer(np.arange(q_len, q_len + n_future), inv)
        cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
        P = np.zeros((d, d))
        P[d // 2:, : d // 2], P[: d // 2, d // 2:] = np.eye(d // 2), -np.eye(d // 2)
        R = (cos[:, :, None] * np.eye(d) + sin[:, :, None] * P).mean(0)
        mu, C = mu @ R.T, R @ C @ R.T
    Kr, Vr = K[n_sink:], V[n_sink:]
    s = Kr @ mu / math.sqrt(d) + np.sum((Kr @ C) * Kr, axis=1) / d / 2
    s = np.exp(s - s.max())
    s /= s.sum()
    s = s * np.linalg.norm(Vr, axis=1)
    return np.concatenate([np.full(n_sink, s.max() + 1), s])


def snapkv_select(K, Qwin, budget, causal, window=32, kernel=5):
    """SnapKV SnapKVCluster.update_kv (window 32, kernel 5, avgpool): the window keys plus the top
    (budget - window) prefix keys by the window queries' attention, summed and average-pooled.

    Causal: the window is the last ``window`` positions of the cache (queries and keys), masked causally inside
    it. Encoder adaptation: the window queries see every key and no key is forced in.
    """
    n, d = K.shape
    w = Qwin.shape[0]
    S = Qwin @ K.T / math.sqrt(d)
    if causal:
        S[:, n - w:] += np.where(np.tri(w, dtype=bool), 0.0, -np.inf)
    S = np.exp(S - S.max(1, keepdims=True))
    S /= S.sum(1, keepdims=True)
    if causal:
        att = S[:, : n - w].sum(0)
        pooled = np.convolve(np.pad(att, kernel // 2), np.ones(kernel) / kernel, mode="valid")  # count_include_pad
        if budget <= w:
            return np.arange(n - budget, n)
        top = np.argsort(-pooled, kind="stable")[: budget - w]
        return np.sort(np.concatenate([top, np.arange(n - w, n)]))
    att = S.sum(0)
    pooled = np.convolve(np.pad(att, kernel // 2), np.ones(kernel) / kernel, mode="valid")
    return np.sort(np.argsort(-pooled, kind="stable")[:budget])


# ----------------------------------------------------------------------------- one head
def head_rows(Q, K, V, Qpre, causal, rope_theta):
    """Masses of every selector at every budget for one head of one document."""
    from streamlev.eval import key_scores

    n = K.shape[0]
    n0 = (3 * n) // 4
    if causal:
        Qseen, Qeval, Qpre_seen = Q[:n0], Q[n0:], Qpre[:n0]
        Kc, Vc = K[:n0], V[:n0]
    else:
        ev = np.arange(n) % 4 == 3
        Qseen, Qeval, Qpre_seen = Q[~ev], Q[ev], Qpre[~ev]
        Kc, Vc = K, V
    N, d = Kc.shape
    S = Qeval @ Kc.T / math.sqrt(d)
    P = np.exp(S - S.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    col = P.mean(0)
    qs = QuerySketch(d).update(Qseen)
    scores = {m: key_scores(m, Kc) for m in BASELINES}
    scores["ti_leverage"] = shift_invariant_leverage(Kc)
    scores["expected_logit"] = expected_logit_scores(Kc, qs)
    scores["query_span_lev"] = query_span_leverage(Kc, qs)
    scores["eap_kvpress"] = eap_scores(Kc, Vc, Qpre_seen, rope_theta=rope_theta, q_len=N)
    scores["eap_kvpress_novnorm"] = eap_scores(Kc, np.ones_like(Vc), Qpre_seen, rope_theta=rope_theta, q_len=N)
    if rope_theta is not None:
        # the sketch summarises pre-RoPE queries; future queries sit at positions N .. N+511 (as kvpress assumes)
        qpre = QuerySketch(d).update(Qpre_seen)
        rot = rope_rotations(d, np.linspace(N, N + 511, 16), rope_theta)
        scores["expected_logit_rope"] = expected_logit_scores(Kc, qpre, rotations=rot)
    rk = {m: np.argsort(np.argsort(scores[m], kind="stable"), kind="stable") for m in ("ti_leverage", "keydiff")}
    scores["ti_lev+keydiff"] = rk["ti_leverage"] + rk["keydiff"]  # rank average
    out = {}
    for f in FRACS:
        B = max(1, int(N * f))
        sinks, recent = budget_split(B, N, causal=causal)
        r = {"oracle": float(np.sort(col)[::-1][:B].sum())}
        for m, s in scores.items():
            r[m] = float(col[select(s, B)].sum())
        if causal:
            for m in ("ti_leverage", "keydiff", "knorm_small", "ti_lev+keydiff", "expected_logit",
                      "expected_logit_rope"):
                r[m + "+SR"] = float(col[select(scores[m], B, sinks=sinks, recent=recent)].sum())
                r[m + "+S"] = float(col[select(scores[m], B, sinks=sinks)].sum())
        else:  # the query-class default keeps the first SINKS keys in every model (as kvpress does)
            for m in ("expected_logit", "keydiff"):
                r[m + "+S"] = float(col[select(scores[m], B, sinks=min(SINKS, B // 4))].sum())
        r["snapkv"] = float(col[snapkv_select(Kc, Qseen[-32:], B, causal)].sum())
        out[f] = r
    return out, (Qeval, Kc, Vc, P)


def run_dataset(name, sample, causal, rope_theta=None, max_docs=None):
    rows = []
    ptr = sample.doc_ptr
    ndoc = len(ptr) - 1 if max_docs is None else min(max_docs, len(ptr) - 1)
    qpre = sample.extra.get("q_prerope", sample.q)
    checked = False
    for di in range(ndoc):
        print(f"{name}: document {di + 1}/{ndoc}", file=sys.stderr, flush=True)
        a, b = int(ptr[di]), int(ptr[di + 1])
        for li in range(sample.n_layers):
            for h in range(sample.n_heads):
                Q = np.asarray(sample.q[li, h, a:b], np.float64)
                K = np.asarray(sample.k[li, h, a:b], np.float64)
                V = np.asarray(sample.v[li, h, a:b], np.float64)
                Qp = np.asarray(qpre[li, h, a:b], np.float64)
                res, (Qe, Kc, Vc, P) = head_rows(Q, K, V, Qp, causal, rope_theta)
                if not checked:  # our mass == streamlev.eval.head_metrics' mass
                    from streamlev.eval import head_metrics

                    kept = select(Kc @ Qe.mean(0), len(Kc) // 8)
                    hm = head_metrics(Qe, Kc, None, kept, eps=(0.5,))["mass"]
                    assert abs(hm - P[:, kept].sum(1).mean()) < 1e-9, (hm, P[:, kept].sum(1).mean())
                    checked = True
                for f, r in res.items():
                    rows.append({"dataset": name, "doc": di, "layer": int(sample.layers[li]), "head": h,
                                 "frac": f, **r})
    return rows


def summarize(rows):
    out = {}
    for ds in sorted({r["dataset"] for r in rows}):
        for f in FRACS:
            sub = [r for r in rows if r["dataset"] == ds and r["frac"] == f]
            keys = [k for k in sub[0] if k not in ("dataset", "doc", "layer", "head", "frac")]
            out[(ds, f)] = {k: float(np.mean([r[k] for r in sub])) for k in keys}
            out[(ds, f)]["_heads"] = len(sub)
    return out


# The documented defaults of each class (see docs/softmax_selectors.md); filled in from the measurements.
DEFAULTS = {"encoder": ("keydiff", "expected_logit+S"), "causal": ("keydiff+SR", "expected_logit_rope+S")}


def _classes(ds):
    causal = "decoder" in ds
    key = [("oracle", "k--"), ("keydiff", "b-o"), ("knorm_small", "c-o"), ("streaming_llm", "g-o"),
           ("sketch_leverage", "y-o"), ("leverage", "m:o"), ("ti_leverage", "r-s")]
    qry = [("oracle", "k--"), ("eap_kvpress", "b-o"), ("eap_kvpress_novnorm", "c-o"), ("snapkv", "g-o"),
           ("query_span_lev", "m:s"), ("expected_logit", "r-s")]
    if not causal:
        qry += [("expected_logit+S", "k-s")]
    if causal:
        key += [("ti_leverage+SR", "r--s"), ("keydiff+SR", "k-s")]
        qry += [("expected_logit_rope+S", "k-s"), ("expected_logit_rope+SR", "r--s")]
    return {"key-only": key, "query statistics": qry}


KEY_PEERS = ("random", "knorm_large", "knorm_small", "keydiff", "sketch_leverage", "leverage", "streaming_llm")
QUERY_PEERS = ("eap_kvpress", "eap_kvpress_novnorm", "snapkv")


def markdown(summ, defaults):
    """Markdown tables: every selector's mass and share of the oracle, per dataset and budget."""
    lines = []
    for ds in sorted({ds for ds, _ in summ}):
        cols = [summ[(ds, f)] for f in FRACS]
        names = [k for k in cols[0] if not k.startswith("_")]
        lines += [f"\n**{ds}** ({cols[0]['_heads']} head x document pairs; mass, and share of the oracle)\n",
                  "| selector | class | N/16 | N/8 | N/4 |", "|---|---|---|---|---|"]
        for m in sorted(names, key=lambda m: -cols[0][m]):
            cls = ("oracle" if m == "oracle" else "key-only peer" if m in KEY_PEERS else
                   "query peer" if m in QUERY_PEERS else
                   "query (ours)" if m.startswith(("expected", "query_span")) else "key-only (ours)")
            star = " **default**" if m in defaults.get(ds, ()) else ""
            cells = [f"{c[m]:.3f} ({c[m] / c['oracle']:.0%})" for c in cols]
            lines.append(f"| `{m}`{star} | {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summ, classes, path):
    """One row per dataset, one column per class: share of the oracle's mass against the budget."""
    dss = sorted({ds for ds, _ in summ})
    fig, axes = oracle_plot.subplots(len(dss), 2, figsize=(9, 3.1 * len(dss)))
    for i, ds in enumerate(dss):
        for j, (title, members) in enumerate(classes(ds).items()):
            ax = axes[i, j]
            for m, style in members:
                y = [summ[(ds, f)].get(m, np.nan) / summ[(ds, f)]["oracle"] for f in FRACS]
                ax.plot(range(len(FRACS)), y, style, label=m, lw=2 if style.startswith("k") else 1.2, ms=4)
            oracle_plot.style_panel(ax, f"{ds}: {title}", fontsize=9)
            ax.set_ylabel("share of oracle mass", fontsize=8)
            ax.legend(fontsize=6.5, loc="lower right")
    oracle_plot.save(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minilm", help="npz from examples/extract_keys.py (default: the embedded sample)")
    ap.add_argument("--decoder", help="npz from examples/extract_decoder_keys.py")
    ap.add_argument("--json", help="write per-head rows and the summary here")
    ap.add_argument("--from-json", help="re-summarise rows written by --json instead of recomputing")
    ap.add_argument("--figure", help="write the PNG figure here")
    ap.add_argument("--markdown", help="write the tables here")
    ap.add_argument("--max-docs", type=int, default=None, help="use only the first documents of each file")
    a = ap.parse_args(argv)
    t = time.time()
    rows = []
    if a.from_json:
        with open(a.from_json) as fh:
            rows = [{**r, "frac": float(r["frac"])} for r in json.load(fh)["rows"]]
        return finish(a, rows, t)
    enc = load_qkv(a.minilm) if a.minilm else load_minilm()
    rows += run_dataset("MiniLM (encoder)", enc, causal=False, max_docs=a.max_docs)
    if a.decoder:
        dec = load_qkv(a.decoder)
        rows += run_dataset("SmolLM2-135M (decoder)", dec, causal=True,
                            rope_theta=float(dec.extra["rope_theta"]), max_docs=a.max_docs)
    return finish(a, rows, t)


def finish(a, rows, t):
    summ = summarize(rows)
    for (ds, f), r in summ.items():
        o = r["oracle"]
        print(f"\n{ds}  budget N*{f:g}  ({r['_heads']} head-docs)  oracle mass {o:.3f}")
        for k, v in sorted(r.items(), key=lambda kv: -kv[1] if not kv[0].startswith("_") else 0):
            if not k.startswith("_"):
                print(f"  {k:24s} {v:.3f}  ({v / o:6.1%} of oracle)")
    print(f"\n[{time.time() - t:.0f} s]", file=sys.stderr)
    defaults = {ds: DEFAULTS["causal" if "decoder" in ds else "encoder"] for ds, _ in summ}
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(markdown(summ, defaults) + "\n")
    if a.figure:
        plot(summ, _classes, a.figure)
    if a.json and not a.from_json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "summary": [{"dataset": ds, "frac": f, **r} for (ds, f), r in summ.items()]},
                      fh)
    return rows, summ


if __name__ == "__main__":
    main()
