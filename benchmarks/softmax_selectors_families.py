#!/usr/bin/env python3
"""Softmax key selection across model families: streamlev's defaults against peers run as real code.

Protocol: ``benchmarks/_families.py`` (the one of ``benchmarks/softmax_selectors.py``,
per key/value head: one kept set shared by the query heads of a group).
Budgets N/16, N/8, N/4 of the cache size N. Metric: mean softmax mass of the
kept keys over the evaluation queries; the oracle is the best fixed set.

Selectors (every one sees the cache keys; the query class also sees the *seen* queries):

* ours: :func:`streamlev.selectors.select_softmax` without queries (key-only
  default) and with the seen queries (query default), given ``causal`` and
  ``window`` (the model structure);
* key-only peers: kvpress ``KnormPress`` (keeps small norms), the opposite rule
  (largest norms), ``KeyDiffPress``, ``StreamingLLMPress`` -- the presses'
  ``score`` run on the cache keys (kvpress 0.5.5, real code) --, a seeded random
  pick, plain leverage and shift-invariant leverage (streamlev);
* query peers: ``K @ mean(q)`` (the mean of the group's seen queries),
  kvpress ``ExpectedAttentionPress`` (defaults, and without the value norm),
  ``SnapKVPress`` and ``TOVAPress`` -- real kvpress code, fed through a
  minimal attention module whose ``q_proj`` is the identity on the pre-RoPE
  seen queries and whose rotary embedding is the model's (identity without
  RoPE). kvpress is written for causal prefill; on the bidirectional families
  (MiniLM, ViT) SnapKV and TOVA are replaced by their rule applied
  bidirectionally (the last 64 resp. the last seen query's attention, summed
  over the group and average-pooled for SnapKV), marked "adapted". Peers are run
  as they are: they do not know about sliding windows.

Usage::

    python benchmarks/softmax_selectors_families.py --data-dir DIR \\
        --json /tmp/families.json --markdown /tmp/families.md --figure docs/figures/softmax_families.png
    python benchmarks/softmax_selectors_families.py --data-dir DIR --streaming   # streaming vs offline

The data files are written by ``examples/extract_keys.py`` (MiniLM),
``examples/extract_decoder_keys.py`` (SmolLM2), ``examples/extract_vit_keys.py``
(ViT, 224, 448 and 518 px) and ``examples/extract_gemma3_keys.py`` (Gemma 3); see
``docs/softmax_selectors.md`` for the exact commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _oracle_plot as oracle_plot  # noqa: E402
from _families import FAMILY_FILES, FRACS, groups  # noqa: E402

from streamlev.leverage import leverage_scores  # noqa: E402
from streamlev.selectors import select_softmax, shift_invariant_leverage  # noqa: E402
from streamlev.softmax_scores import observed_attention  # noqa: E402
from streamlev.softmax_selector import QUERY_BUFFER, QUERY_HALF_LIFE, SoftmaxSelector, default_selector  # noqa: E402

TUNING = ("MiniLM", "SmolLM2")  # every rule and constant was chosen on these two families
CONFIRMATION = ("ViT-S/14 224px", "ViT-S/14 448px", "ViT-S/14 518px", "Gemma3-270M")
KEY_PEERS = ("kvpress_knorm", "knorm_large", "kvpress_keydiff", "kvpress_streamingllm", "random", "leverage",
             "ti_leverage")
QUERY_PEERS = ("mean_query", "kvpress_eap", "kvpress_eap_novnorm", "snapkv", "tova")
OURS = {"key-only": "default_key", "query": "default_query"}
# Ablations of the defaults (SoftmaxSelector keyword arguments; "q" marks the query class), reported in the full tables.
VARIANTS = {
    "observed_not_moved": (True, dict(rule="observed", sinks=0, recent=0, half_life=128.0, rope_theta=None)),
    "observed_no_decay": (True, dict(rule="observed", sinks=0, recent=0)),
    "observed_all_queries": (True, dict(rule="observed", sinks=0, recent=0, half_life=128.0, query_buffer=1 << 20)),
    "observed+sinks4": (True, dict(rule="observed", sinks=4, recent=0, half_life=128.0)),
    "observed_newest_buffer": (True, dict(rule="observed", sinks=0, recent=0, half_life=128.0, query_sample="newest")),
    "small_norm+sinks+recent25%": (False, dict(rule="small_norm", recent_fraction=0.25)),
    "keydiff+sinks+recent50%": (False, dict(rule="keydiff", recent_fraction=0.5)),
    "large_norm+sinks1": (False, dict(rule="large_norm", sinks=1, recent=0)),
}


# ----------------------------------------------------------------------------- kvpress, as real code
def _kvpress():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from kvpress import (ExpectedAttentionPress, KeyDiffPress, KnormPress, SnapKVPress, StreamingLLMPress,
                         TOVAPress)

    return torch, dict(knorm=KnormPress, keydiff=KeyDiffPress, streaming=StreamingLLMPress,
                       eap=ExpectedAttentionPress, snapkv=SnapKVPress, tova=TOVAPress)


def _cos_sin(torch, positions, d, theta):
    """Rotate-half RoPE tables (1, T, d) at the given positions; identity when theta is None."""
    pos = torch.as_tensor(positions, dtype=torch.float64)
    if theta is None:
        return torch.ones(1, pos.numel(), d, dtype=torch.float64), torch.zeros(1, pos.numel(), d, dtype=torch.float64)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(pos, inv)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos()[None], emb.sin()[None]


def _module(torch, g, d, theta):
    """The least an attention module needs to offer kvpress's query-aware presses."""
    mod = torch.nn.Module()
    mod.config = types.SimpleNamespace(num_attention_heads=g, num_key_value_heads=1)
    mod.head_dim = d
    mod.q_proj = torch.nn.Identity()
    mod.rotary_emb = lambda x, position_ids: _cos_sin(torch, position_ids[0], d, theta)
    return mod


def _top(scores, B):
    s = np.asarray(scores, np.float64)
    return np.sort(np.lexsort((np.arange(s.size), -s))[:B])


def peer_sets(g, Bs, kv):
    """Kept sets of every peer at every budget, {name: {B: ids}}."""
    torch, P = kv
    K, V, N, d = g.K, g.V, g.N, g.K.shape[1]
    kt, vt = torch.from_numpy(K)[None, None], torch.from_numpy(V)[None, None]
    scores = {
        "kvpress_knorm": P["knorm"]().score(None, None, kt, vt, None, None)[0, 0].numpy(),
        "kvpress_keydiff": P["keydiff"]().score(None, None, kt, vt, None, None)[0, 0].numpy(),
        "random": np.random.default_rng(1000 * g.doc + 10 * g.layer + g.kv_head).random(N),
        "leverage": leverage_scores(K),
        "ti_leverage": shift_invariant_leverage(K),
    }
    scores["knorm_large"] = -scores["kvpress_knorm"]
    # analysis rows, not peers: the keys themselves, and their negatives, as stand-in queries (bidirectional models
    # compute q and k from the same tokens; which sign the real queries follow is what a key-only rule cannot know)
    scores["keys_as_queries"] = _attention(K[None], K)[0].mean(0)
    scores["negated_keys_as_queries"] = _attention(-K[None], K)[0].mean(0)
    Qs = g.Qseen
    gq, m = Qs.shape[0], Qs.shape[1]
    scores["mean_query"] = K @ Qs.reshape(-1, d).mean(0)
    Qp = g.Qseen_pre if g.Qseen_pre is not None else Qs
    hidden = torch.from_numpy(np.ascontiguousarray(Qp.transpose(1, 0, 2).reshape(1, m, gq * d)))
    mod = _module(torch, gq, d, g.rope_theta)
    with torch.no_grad():
        scores["kvpress_eap"] = P["eap"]().score(mod, hidden, kt, vt, None, {})[0, 0].numpy()
        scores["kvpress_eap_novnorm"] = P["eap"](use_vnorm=False).score(mod, hidden, kt, vt, None, {})[0, 0].numpy()
        if g.causal:
            pe = _cos_sin(torch, g.seen_pos, d, g.rope_theta)
            scores["snapkv"] = P["snapkv"]().score(mod, hidden, kt, vt, None, {"position_embeddings": pe})[0, 0].numpy()
            scores["tova"] = P["tova"]().score(mod, hidden, kt, vt, None, {"position_embeddings": pe})[0, 0].numpy()
        else:
            scores["snapkv"] = _snapkv_bidirectional(Qs[:, -64:], K)
            scores["tova"] = _attention(Qs[:, -1:], K).mean(axis=(0, 1))
    out = {name: {B: _top(s, B) for B in Bs} for name, s in scores.items()}
    out["kvpress_streamingllm"] = {B: streaming_llm_set(kv, kt, B) for B in Bs}
    return out


def streaming_llm_set(kv, kt, B):
    """kvpress StreamingLLMPress keeps what its score marks for the compression ratio whose n_kept is B."""
    torch, P = kv
    N = kt.shape[2]
    press = P["streaming"](compression_ratio=1.0 - (B + 0.5) / N)  # int(N * (1 - ratio)) == B exactly
    return _top(press.score(None, None, kt, kt, None, None)[0, 0].numpy(), B)


def _attention(Q, K):
    S = np.einsum("hid,jd->hij", Q, K) / math.sqrt(K.shape[1])
    P = np.exp(S - S.max(-1, keepdims=True))
    return P / P.sum(-1, keepdims=True)


def _snapkv_bidirectional(Qwin, K, kernel=5):
    att = _attention(Qwin, K).mean(axis=(0, 1))
    return np.convolve(np.pad(att, kernel // 2), np.ones(kernel) / kernel, mode="valid")


# ----------------------------------------------------------------------------- one group
def group_rows(g, kv):
    Bs = [max(1, int(g.N * f)) for f in FRACS]
    sets = peer_sets(g, Bs, kv)
    for B in Bs:
        sets.setdefault("default_key", {})[B] = select_softmax(g.K, B, causal=g.causal, window=g.window)
        sets.setdefault("default_query", {})[B] = select_softmax(g.K, B, queries=g.Qseen, causal=g.causal,
                                                                 window=g.window, rope_theta=g.rope_theta)
    for name, (use_q, kw) in VARIANTS.items():
        kw = dict(kw)
        kw.setdefault("rope_theta", g.rope_theta)
        if not g.causal:  # sinks/recent/half-life are causal notions, except an explicit sink
            kw.pop("half_life", None)
            kw["rope_theta"] = None
            kw.pop("recent_fraction", None)
            kw["recent"] = 0
            kw.setdefault("sinks", 0)
        for B in Bs:
            sk = SoftmaxSelector(g.K.shape[1], B, causal=g.causal, window=g.window, **kw)
            sets.setdefault(name, {})[B] = sk.update(g.K, g.Qseen if use_q else None).kept()
    # the rejected GQA pooling: max over the group's heads instead of the mean (otherwise the query default)
    mx = observed_attention(g.K, np.arange(g.N), g.Qseen[:, -QUERY_BUFFER:], g.seen_pos[-QUERY_BUFFER:], next_pos=g.N,
                            causal=g.causal, window=g.window,
                            rope_theta=g.rope_theta if g.causal else None, half_life=QUERY_HALF_LIFE if g.causal
                            else None, pool="max")
    live = np.arange(g.N) > (g.N - g.window if g.window else -1)
    sets["observed_max_pool"] = {B: _top(np.where(live, mx, -np.inf), min(B, int(live.sum()))) for B in Bs}
    rows = []
    for f, B in zip(FRACS, Bs):
        r = {"family": g.family, "doc": g.doc, "layer": g.layer, "kv_head": g.kv_head, "frac": f,
             "window": g.window or 0, "oracle": g.oracle(B)}
        for name, per in sets.items():
            r[name] = g.mass(per[B])
        if g.window:  # kept keys that no later query can see (outside the window of position N)
            for name, per in sets.items():
                r["expired:" + name] = int(np.sum(per[B] <= g.N - g.window))
        rows.append(r)
    return rows


def streaming_rows(g, block=64):
    """Streamed (blocks of ``block`` keys with their seen queries) against offline, for both defaults."""
    rows = []
    d = g.K.shape[1]
    seen = np.zeros(g.N, bool)
    seen[g.seen_pos[g.seen_pos < g.N]] = True
    qidx = np.full(g.N, -1)
    qidx[g.seen_pos[g.seen_pos < g.N]] = np.arange(int(seen.sum()))
    for f in FRACS:
        B = max(1, int(g.N * f))
        for cls, use_q in (("key-only", False), ("query", True)):
            off = select_softmax(g.K, B, queries=g.Qseen if use_q else None, causal=g.causal, window=g.window,
                                 rope_theta=g.rope_theta)
            sk = default_selector(d, B, queries=use_q, causal=g.causal, window=g.window, rope_theta=g.rope_theta)
            for a in range(0, g.N, block):
                b = min(g.N, a + block)
                if use_q and g.causal:
                    sk.update(g.K[a:b], g.Qseen[:, a:b])
                elif use_q:
                    sk.update(g.K[a:b], g.Qseen[:, qidx[a:b][seen[a:b]]])
                else:
                    sk.update(g.K[a:b])
            st = sk.kept()
            rows.append({"family": g.family, "frac": f, "class": cls, "offline": g.mass(off), "streaming": g.mass(st),
                         "overlap": len(np.intersect1d(off, st)) / max(1, len(off)), "oracle": g.oracle(B)})
    return rows


# ----------------------------------------------------------------------------- summaries
def summarize(rows):
    out = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        for f in FRACS:
            sub = [r for r in rows if r["family"] == fam and r["frac"] == f]
            names = [k for k in sub[0] if isinstance(sub[0][k], float) and k not in ("frac",)]
            out[(fam, f)] = {k: float(np.mean([r[k] for r in sub])) for k in names}
            out[(fam, f)]["_n"] = len(sub)
            for cls, peers in (("key-only", KEY_PEERS), ("query", QUERY_PEERS)):
                best = max(peers, key=lambda p: out[(fam, f)][p])
                diff = np.array([r[OURS[cls]] - r[best] for r in sub])
                out[(fam, f)][f"_best_{cls}"] = best
                out[(fam, f)][f"_diff_{cls}"] = float(diff.mean())
                out[(fam, f)][f"_se_{cls}"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return out


def markdown(summ):
    lines = []
    fams = list(dict.fromkeys(fam for fam, _ in summ))
    for group_name, members in (("Tuning families (rules and constants chosen here)", TUNING),
                                ("Confirmation families (never used to choose anything)", CONFIRMATION)):
        present = [f for f in fams if f in members]
        if not present:
            continue
        lines += [f"\n### {group_name}\n",
                  "| family | class | default: N/16 | N/8 | N/4 | best peer: N/16 | N/8 | N/4 | default >= best peer "
                  "(paired difference ± s.e.; N/16, N/8, N/4) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for fam in present:
            for cls in ("key-only", "query"):
                c = [summ[(fam, f)] for f in FRACS]
                mine = [f"{x[OURS[cls]]:.3f} ({x[OURS[cls]] / x['oracle']:.0%})" for x in c]
                peer = [f"{x[x['_best_' + cls]]:.3f} `{x['_best_' + cls]}`" for x in c]
                ok = [("yes" if x["_diff_" + cls] >= 0 else "**no**") + f" ({x['_diff_' + cls]:+.3f} ± "
                      f"{x['_se_' + cls]:.3f})" for x in c]
                lines.append(f"| {fam} | {cls} | " + " | ".join(mine + peer) + " | " + ", ".join(ok) + " |")
    for fam in fams:
        c = [summ[(fam, f)] for f in FRACS]
        names = [k for k in c[0] if not k.startswith("_") and not k.startswith("expired")]
        lines += [f"\n**{fam}** ({c[0]['_n']} key/value-head x document pairs; mass and share of the oracle)\n",
                  "| selector | N/16 | N/8 | N/4 |", "|---|---|---|---|"]
        for m in sorted(names, key=lambda m: -c[0][m]):
            star = " **default**" if m in OURS.values() else ""
            lines.append(f"| `{m}`{star} | " + " | ".join(f"{x[m]:.3f} ({x[m] / x['oracle']:.0%})" for x in c) + " |")
    return "\n".join(lines)


def plot(summ, path):
    fams = list(dict.fromkeys(fam for fam, _ in summ))
    fig, axes = oracle_plot.subplots(2, len(fams), figsize=(3.2 * len(fams), 6.2))
    for j, fam in enumerate(fams):
        for i, (cls, peers) in enumerate((("key-only", KEY_PEERS), ("query", QUERY_PEERS))):
            ax = axes[i, j]
            for m in peers + (OURS[cls],):
                y = [summ[(fam, f)][m] / summ[(fam, f)]["oracle"] for f in FRACS]
                ours = m == OURS[cls]
                ax.plot(range(3), y, "k-s" if ours else "-o", lw=2.2 if ours else 1, ms=4, label=m)
            tag = "tuning" if fam in TUNING else "confirmation"
            oracle_plot.style_panel(ax, f"{fam} ({tag})\n{cls}", fontsize=8)
            if j == 0:
                ax.set_ylabel("share of oracle mass", fontsize=8)
            if j == len(fams) - 1:
                ax.legend(fontsize=6, loc="lower right")
    oracle_plot.save(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", help="folder with the .npz files named in FAMILY_FILES")
    ap.add_argument("--from-json", help="comma-separated --json outputs to re-summarise instead of recomputing")
    ap.add_argument("--families", default=",".join(FAMILY_FILES), help="comma-separated subset")
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--figure")
    ap.add_argument("--streaming", action="store_true", help="measure streamed (blocks of 64) against offline")
    a = ap.parse_args(argv)
    t = time.time()
    rows = []
    if a.from_json:
        for path in a.from_json.split(","):
            with open(path) as fh:
                rows += json.load(fh)["rows"]
        return _finish(a, rows, t)
    if not a.data_dir:
        ap.error("--data-dir is required unless --from-json is given")
    kv = None if a.streaming else _kvpress()
    for fam in a.families.split(","):
        path = os.path.join(a.data_dir, FAMILY_FILES[fam])
        if not os.path.exists(path):
            print(f"skipping {fam}: {path} not found", file=sys.stderr)
            continue
        for g in groups(fam, path, max_docs=a.max_docs):
            rows += streaming_rows(g) if a.streaming else group_rows(g, kv)
        print(f"{fam}: done [{time.time() - t:.0f} s]", file=sys.stderr, flush=True)
    if a.streaming:
        for fam in dict.fromkeys(r["family"] for r in rows):
            for cls in ("key-only", "query"):
                cells = []
                for f in FRACS:
                    sub = [r for r in rows if r["family"] == fam and r["class"] == cls and r["frac"] == f]
                    o = np.mean([r["oracle"] for r in sub])
                    cells.append(f"offline {np.mean([r['offline'] for r in sub]) / o:.1%} streamed "
                                 f"{np.mean([r['streaming'] for r in sub]) / o:.1%} overlap "
                                 f"{np.mean([r['overlap'] for r in sub]):.0%}")
                print(f"| {fam} | {cls} | " + " | ".join(cells) + " |")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"rows": rows}, fh)
        return rows
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows}, fh)
    return _finish(a, rows, t)


def _finish(a, rows, t):
    order = {f: i for i, f in enumerate(FAMILY_FILES)}
    rows = sorted(rows, key=lambda r: order.get(r["family"], 99))
    summ = summarize(rows)
    md = markdown(summ)
    print(md)
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(md + "\n")
    if a.figure:
        plot(summ, a.figure)
    print(f"[{time.time() - t:.0f} s]", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
