#!/usr/bin/env python3
"""Tables (markdown) and figures (PNG) from the JSON files of ``benchmarks/kv_cache_eval.py``.

    python benchmarks/kv_cache_report.py /tmp/smollm2.json /tmp/gemma3.json \\
        --markdown /tmp/kv_tables.md --figure-dir docs/figures

Files of the same model are merged, later files replacing the rows (method, budget, ...) they contain.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

LABEL = {"sl_default": "streamlev default (observed, 64 queries / 8 positions, x ||v||, 4 sinks, 50% recent)",
         "sl_expected": "streamlev expected attention (rank-8)", "sl_obs64s8_vn": "streamlev observed 64/8 x ||v|| (the default before sinks + recent)",
         "sl_obs64s8_vn_r25": "streamlev observed 64/8 x ||v||, 4 sinks, 25% recent",
         "sl_obs64s8_vn_r50": "streamlev observed 64/8 x ||v||, 4 sinks, 50% recent (= default)",
         "sl_obs128s4_vn": "streamlev observed 128/4 x ||v||", "sl_obs128s4": "streamlev observed 128/4",
         "sl_observed_vn": "streamlev observed (#16) x ||v||", "sl_obs64s8_vn_win": "streamlev observed 64/8 x ||v||, sliding layers = window",
         "sl_obs64s8_vn_r25_win": "streamlev observed 64/8 x ||v||, 4 sinks, 25% recent, sliding layers = window",
         "sl_obs64s8_vn_r50_win": "streamlev default, sliding layers = window",
         "sl_obs128s4_vn_win": "streamlev observed 128/4 x ||v||, sliding layers = window",
         "sl_default_vn": "streamlev expected attention x ||v||",
         "sl_expected_win": "streamlev expected attention, sliding layers = window", "sl_default_exact": "streamlev expected attention, exact cov.",
         "sl_keydiff": "streamlev KeyDiff+sinks+25% recent", "sl_append": "streamlev expected attention, append-only",
         "sl_observed": "streamlev observed (#16 query default)", "sl_keys": "streamlev small-norm+50% recent (#16 key-only)",
         "sl_default_win": "streamlev expected attention, sliding layers = window",
         "sl_keydiff_win": "streamlev KeyDiff, sliding layers = window",
         "sl_observed_win": "streamlev observed (#16), sliding layers = window",
         "sl_keys_win": "streamlev small-norm+50% recent (#16), sliding layers = window",
         "kv_streaming_llm_full": "kvpress StreamingLLM (full layers, prefill)", "kv_knorm_full": "kvpress Knorm (full layers, prefill)",
         "kv_keydiff_full": "kvpress KeyDiff (full layers, prefill)", "kv_snapkv_full": "kvpress SnapKV (full layers, prefill)",
         "kv_tova_full": "kvpress TOVA (full layers, prefill)",
         "sl_leverage": "streamlev guarantee (x^2 universal set)", "kv_streaming_llm": "kvpress StreamingLLM",
         "kv_knorm": "kvpress Knorm", "kv_keydiff": "kvpress KeyDiff", "kv_expected_attention":
         "kvpress ExpectedAttention", "kv_snapkv": "kvpress SnapKV (prefill only)", "kv_tova": "kvpress TOVA"}


def label(m):
    """Readable name of a method; ``sl_obs<W>[s<s>][h<H>][_win]`` are observed-attention variants."""
    obs = re.fullmatch(r"sl_obs(\d+)(?:s(\d+))?(?:h(\d+))?(_win)?", m)
    if not obs:
        return LABEL.get(m, m)
    W, st = int(obs[1]), int(obs[2] or 1)
    which = f"newest {W} queries" if st == 1 else f"{W} queries, every {st}th position"
    return (f"streamlev observed, {which}, half-life {float(obs[3] or W * st / 4):g}"
            + (", sliding layers = window" if obs[4] else ""))


def fmt_frac(f):
    return f"1/{round(1 / f)}" if f < 1 else "full"


def ppl_table(res):
    rows = [r for r in res["ppl"] if "error" not in r]
    full = next(r for r in rows if r["method"] == "full")
    fracs = sorted({r["frac"] for r in rows if r["method"] != "full"})
    by = {(r["method"], r["frac"]): r for r in rows}
    errs = {(r["method"], r["frac"]): r["error"] for r in res["ppl"] if "error" in r}
    methods = [m for m in res["methods"] if any((m, f) in by or (m, f) in errs for f in fracs)]
    out = [f"Full cache: perplexity {full['ppl']:.3f} on {res['continuation']} held-out tokens after "
           f"{res['context']} tokens of context ({full['bytes'] / 2**20:.1f} MiB of keys and values).", "",
           "| method | " + " | ".join(f"KL @ {fmt_frac(f)}" for f in fracs) + " | "
           + " | ".join(f"top-1 @ {fmt_frac(f)}" for f in fracs) + " | "
           + " | ".join(f"ppl @ {fmt_frac(f)}" for f in fracs) + " | " + " | ".join(f"mem @ {fmt_frac(f)}" for f in fracs)
           + " |", "|---" * (1 + 4 * len(fracs)) + "|"]
    best = {}
    for f in fracs:
        peers = [by[(m, f)] for m in methods if m.startswith("kv_") and (m, f) in by]
        if peers:
            best[f] = (min(p["kl"] for p in peers), max(p["top1"] for p in peers), min(p["ppl"] for p in peers))
    for m in methods:
        cells = []
        for key, fmt in (("kl", "{:.4f}"), ("top1", "{:.3f}"), ("ppl", "{:.2f}"), ("bytes", None)):
            for f in fracs:
                r = by.get((m, f))
                if r is None:
                    cells.append("failed" if (m, f) in errs else "")
                elif key == "bytes":
                    cells.append(f"{r['bytes'] / full['bytes']:.3f}")
                else:
                    v = fmt.format(r[key])
                    b = best.get(f)
                    if b and m.startswith("kv_") and r[key] == {"kl": b[0], "top1": b[1], "ppl": b[2]}[key]:
                        v = f"**{v}**"
                    cells.append(v)
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    if errs:
        out += ["", "Failures: " + "; ".join(f"{m} @ {fmt_frac(f)}: {e}" for (m, f), e in sorted(errs.items()))]
    return "\n".join(out), fracs, by, full


def passkey_table(res):
    rows = [r for r in res["passkey"] if "error" not in r]
    if not rows:
        return ""
    depths = sorted({r["depth"] for r in rows})
    fracs = sorted({r["frac"] for r in rows if r["method"] != "full"})
    acc = defaultdict(list)
    for r in rows:
        acc[(r["method"], r["frac"], r["depth"])].append(r["hit"])
    methods = ["full"] + [m for m in res["methods"] if any(k[0] == m for k in acc)]
    out = ["| method | " + " | ".join(f"{fmt_frac(f)}, depth {d:.0%}" for f in fracs for d in depths) + " |",
           "|---" * (1 + len(fracs) * len(depths)) + "|"]
    for m in methods:
        cells = []
        for f in fracs:
            for d in depths:
                h = acc.get((m, 1.0 if m == "full" else f, d))
                cells.append("" if h is None else ("hit" if all(h) else "miss"))
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def overhead_table(res):
    if not res["overhead"]:
        return ""
    out = ["| method | budget | streamlev step (median ms) | DynamicCache holding B keys (median ms) | overhead (median) | "
           "overhead (mean, incl. batched evictions) |", "|---|---|---|---|---|---|"]
    for r in res["overhead"]:
        out.append(f"| {label(r['method'])} | {r['budget']} ({fmt_frac(r['frac'])}) | {r['step_ms_streamlev']:.1f} | {r['step_ms_dynamic']:.1f}"
                   f" | {100 * r['overhead']:+.1f}% | {100 * r.get('overhead_mean', float('nan')):+.1f}% |")
    return "\n".join(out)


def figure(res, fracs, by, full, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, m in enumerate(res["methods"]):
        xs = [f for f in fracs if (m, f) in by]
        if not xs:
            continue
        style = dict(marker="o", lw=2.2) if m.startswith("sl_") else dict(marker="s", lw=1, ls="--")
        style["color"] = plt.cm.tab20(i % 20)
        axes[0].plot(xs, [by[(m, f)]["kl"] for f in xs], label=label(m), **style)
        axes[1].plot(xs, [by[(m, f)]["ppl"] for f in xs], **style)
    axes[1].axhline(full["ppl"], color="k", lw=0.8, label="full cache")
    for ax, yl in zip(axes, ("mean KL(full || compressed)", "perplexity of the continuation")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(fracs, [fmt_frac(f) for f in fracs])
        ax.set_xlabel("cache budget (fraction of the context)")
        ax.set_ylabel(yl)
    fig.suptitle(f"{res['model']}: {res['context']}-token context, {res['continuation']} decoded tokens")
    fig.legend(loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.72, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--figure-dir", default=None)
    a = ap.parse_args(argv)
    merged = {}
    for p in a.json:  # several files of one model merge; a later file's rows replace an earlier file's
        res = json.loads(Path(p).read_text())
        old = merged.setdefault(res["model"], dict(res, ppl=[], passkey=[], overhead=[], methods=[]))
        old["methods"] += [m for m in res["methods"] if m not in old["methods"]]
        for r in res["overhead"]:
            r.setdefault("method", "sl_default")
        for part, key in (("ppl", ("method", "frac", "doc")), ("passkey", ("method", "frac", "depth")),
                          ("overhead", ("method", "frac"))):
            new_keys = {tuple(r.get(k) for k in key) for r in res[part]}
            old[part] = [r for r in old[part] if tuple(r.get(k) for k in key) not in new_keys] + res[part]
    parts = []
    for res in merged.values():
        table, fracs, by, full = ppl_table(res)
        parts += [f"### {res['model']}", "", table, ""]
        pk = passkey_table(res)
        if pk:
            parts += ["Passkey retrieval (hit = the key appears in 6 greedily decoded tokens):", "", pk, ""]
        oh = overhead_table(res)
        if oh:
            parts += ["Per-token cost of streamlev's bookkeeping (side by side, alternating steps):", "", oh, ""]
        if a.figure_dir:
            figure(res, fracs, by, full, Path(a.figure_dir) / f"kv_cache_{res['model']}.png")
    Path(a.markdown).write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
