#!/usr/bin/env python3
"""Tables (markdown) and figures (PNG) from the JSON files of ``benchmarks/kv_cache_eval.py``.

    python benchmarks/kv_cache_report.py /tmp/smollm2.json /tmp/gemma3.json \\
        --markdown /tmp/kv_tables.md --figure-dir docs/figures

Files of the same model are merged, later files replacing the rows (method, budget, ...) they contain.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _kv_methods import label  # noqa: E402


def fmt_frac(f):
    return f"1/{round(1 / f)}" if f < 1 else "full"


def _doc_name(doc):
    return Path(doc).name if doc else "text"


def aggregate(rows):
    """Per (method, frac): mean KL, geometric-mean perplexity, mean top-1, mean memory share over the texts.

    Memory is each text's bytes over the full cache's bytes on the same text. Rows that failed are left
    out; ``n`` says over how many texts each cell is taken.
    """
    ok = [r for r in rows if "error" not in r]
    full = {r.get("doc"): r for r in ok if r["method"] == "full"}
    cells = defaultdict(list)
    for r in ok:
        if r["method"] != "full":
            cells[(r["method"], r["frac"])].append(r)
    out = {}
    for key, rs in cells.items():
        out[key] = dict(kl=statistics.fmean(r["kl"] for r in rs), top1=statistics.fmean(r["top1"] for r in rs),
                        ppl=math.exp(statistics.fmean(math.log(r["ppl"]) for r in rs)),
                        mem=statistics.fmean(r["bytes"] / full[r.get("doc")]["bytes"] for r in rs), n=len(rs))
    ref = dict(ppl=math.exp(statistics.fmean(math.log(r["ppl"]) for r in full.values())),
               bytes=statistics.fmean(r["bytes"] for r in full.values()), n=len(full))
    return out, ref, sorted(_doc_name(d) for d in full)


def ppl_table(res):
    """One row per method (sorted by mean KL), one cell per budget: mean KL / perplexity / top-1 / memory."""
    by, full, docs = aggregate(res["ppl"])
    fracs = sorted({f for _, f in by})
    errs = {(r["method"], r["frac"]): r["error"] for r in res["ppl"] if "error" in r}
    methods = [m for m in res["methods"] if any((m, f) in by for f in fracs)]
    methods.sort(key=lambda m: statistics.fmean(by[(m, f)]["kl"] for f in fracs if (m, f) in by))
    out = [f"{len(docs)} text(s): {', '.join(docs)}; {res['context']} tokens of context, {res['continuation']} decoded. "
           "Each cell: mean KL / perplexity (geometric mean) / top-1 agreement / memory of the compressed cache "
           "and selector state as a share of the full cache, over the texts.", "",
           "| method | " + " | ".join(f"{f:g} of the context" for f in fracs) + " |", "|---" * (1 + len(fracs)) + "|"]
    for m in methods:
        cells = []
        for f in fracs:
            r = by.get((m, f))
            cells.append("failed" if r is None and (m, f) in errs else "" if r is None else
                         f"{r['kl']:.3f} / {r['ppl']:.2f} / {r['top1']:.2f} / {r['mem']:.2f}"
                         + ("" if r["n"] == len(docs) else f" (n={r['n']})"))
        out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    out += ["", f"Full cache perplexity (geometric mean): {full['ppl']:.2f}"]
    if errs:
        out += ["", "Failures: " + "; ".join(f"{m} @ {fmt_frac(f)}: {e}" for (m, f), e in sorted(errs.items()))]
    out += ["", "Methods: " + "; ".join(f"`{m}` = {label(m)}" for m in methods)]
    return "\n".join(out), fracs, by, full


def paired_table(res, ref):
    """Per method and budget, paired over the texts: mean difference of log-perplexity (method - ``ref``)
    with its standard error, and the texts where the method's KL is lower than ``ref``'s."""
    rows = [r for r in res["ppl"] if "error" not in r and r["method"] != "full"]
    per = {(r["method"], r["frac"], r.get("doc")): r for r in rows}
    fracs = sorted({r["frac"] for r in rows})
    if not any(r["method"] == ref for r in rows):
        return ""
    out = [f"Paired against {label(ref)} (negative: the method has the lower perplexity; ± one standard error "
           "over the texts; wins: texts where its KL is lower):", "",
           "| method | " + " | ".join(f"Δ log-ppl @ {fmt_frac(f)} | KL wins @ {fmt_frac(f)}" for f in fracs) + " |",
           "|---" * (1 + 2 * len(fracs)) + "|"]
    for m in res["methods"]:
        if m == ref:
            continue
        cells = []
        for f in fracs:
            pairs = [(per[(m, f, d)], per[(ref, f, d)]) for (mm, ff, d) in per if mm == m and ff == f
                     and (ref, f, d) in per]
            if not pairs:
                cells += ["", ""]
                continue
            dl = [math.log(a["ppl"]) - math.log(b["ppl"]) for a, b in pairs]
            se = statistics.stdev(dl) / math.sqrt(len(dl)) if len(dl) > 1 else float("nan")
            cells += [f"{statistics.fmean(dl):+.3f} ± {se:.3f}", f"{sum(a['kl'] < b['kl'] for a, b in pairs)}/{len(pairs)}"]
        if any(cells):
            out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def copy_table(res, question=None):
    """Copy task: share of sentences copied exactly and share of tokens right, per method and budget.

    ``question``: the rows whose cue came after the compressed context (None) or ended the prompt ("in_prompt")."""
    rows = [r for r in res.get("copy", []) if "error" not in r and r.get("question") == question]
    if not rows:
        return ""
    fracs = sorted({r["frac"] for r in rows if r["method"] != "full"})
    acc = defaultdict(list)
    for r in rows:
        acc[(r["method"], r["frac"])].append(r)
    methods = ["full"] + [m for m in res["methods"] if any(k[0] == m for k in acc)]
    out = ["| method | " + " | ".join(f"{fmt_frac(f)}: exact, tokens" for f in fracs) + " | hits by depth |",
           "|---" * (2 + len(fracs)) + "|"]
    for m in methods:
        cells, hits = [], defaultdict(int)
        for f in fracs:
            rs = acc.get((m, 1.0 if m == "full" else f))
            if not rs:
                cells.append("")
                continue
            for r in rs:
                hits[r["depth"]] += r["hit"]
            cells.append(f"{statistics.fmean(r['hit'] for r in rs):.2f}, "
                         f"{statistics.fmean(r['tokens_right'] / r['n_tokens'] for r in rs):.2f} (of {len(rs)})")
            if m == "full":
                cells += [""] * (len(fracs) - 1)
                break
        depth = ", ".join(f"{d:.0%}: {h}" for d, h in sorted(hits.items()))
        out.append(f"| {label(m)} | " + " | ".join(cells) + f" | {depth} |")
    return "\n".join(out)


def passkey_table(res, question=None):
    rows = [r for r in res["passkey"] if "error" not in r and r.get("question") == question]
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

    rows = (len(res["methods"]) + 2) // 2  # legend rows below the axes, two entries a row
    height = 3.6 + 0.22 * rows
    fig, axes = plt.subplots(1, 2, figsize=(10, height))
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
    n = full["n"]
    fig.suptitle(f"{res['model']}: {res['context']}-token context, {res['continuation']} decoded tokens"
                 + (f", means over {n} texts" if n > 1 else ""))
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.22 * rows + 0.1) / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--figure-dir", default=None)
    ap.add_argument("--paired", default=None, metavar="METHOD",
                    help="also tabulate each method's paired differences against this one (e.g. sl_default)")
    a = ap.parse_args(argv)
    merged = {}
    for p in a.json:  # several files of one model merge; a later file's rows replace an earlier file's
        res = json.loads(Path(p).read_text())
        old = merged.setdefault(res["model"], dict(res, ppl=[], passkey=[], overhead=[], copy=[], methods=[]))
        old["methods"] += [m for m in res["methods"] if m not in old["methods"]]
        for r in res["overhead"]:
            r.setdefault("method", "sl_default")
        for part, key in (("ppl", ("method", "frac", "doc")), ("passkey", ("method", "frac", "depth", "question")),
                          ("overhead", ("method", "frac")), ("copy", ("method", "frac", "depth", "trial", "question"))):
            new_keys = {tuple(r.get(k) for k in key) for r in res.get(part, [])}
            old[part] = [r for r in old[part] if tuple(r.get(k) for k in key) not in new_keys] + res.get(part, [])
    parts = []
    for res in merged.values():
        parts += [f"### {res['model']}", ""]
        if any("kl" in r for r in res["ppl"]):
            table, fracs, by, full = ppl_table(res)
            parts += [table, ""]
            if a.paired:
                parts += [paired_table(res, a.paired), ""]
            if a.figure_dir:
                figure(res, fracs, by, full, Path(a.figure_dir) / f"kv_cache_{res['model']}.png")
        for question, where in ((None, ""), ("in_prompt", ", the question ending the compressed prompt")):
            cp = copy_table(res, question)
            if cp:
                parts += [f"Retrieval by copying{where} (exact: the whole rest of the sentence; tokens: mean share of "
                          "its tokens right):", "", cp, ""]
            pk = passkey_table(res, question)
            if pk:
                parts += [f"Passkey retrieval{where} (hit = the key appears in 6 greedily decoded tokens):", "", pk, ""]
        oh = overhead_table(res)
        if oh:
            parts += ["Per-token cost of streamlev's bookkeeping (side by side, alternating steps):", "", oh, ""]
    Path(a.markdown).write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
