#!/usr/bin/env python3
"""How far is a selector from the best prompt selection? An oracle that knows where the continuation attends.

For each text, a full-cache pass over context + continuation records, per layer and key/value head, the
attention mass the continuation's queries give each context key (summed over the query heads of the
group and over the decoded steps; eager attention). The ``oracle`` rule then compresses the prompt by
that mass times ``||v||`` -- with 4 sinks and no recent window (``oracle_r0``) or the default's newest
half (``oracle_r50``) -- and the continuation is decoded as in ``kv_cache_eval.py``, in the prefill form
(``mode="prefill"``: decoded keys are appended, so only the prompt selection differs; on Gemma 3 the
sliding layers keep their window). No causal rule can know these scores: the oracle bounds what any
prompt selection could reach at the budget, and separates "the budget is too small" from "the rule
predicts the continuation badly". streamlev's default and StreamingLLM rule run in the same form.

    HF_HUB_OFFLINE=1 python benchmarks/kv_cache_oracle.py --model gemma3 --docs 8 --topics ... --json /tmp/oracle.json

The JSON has the layout of ``kv_cache_eval.py`` (``ppl`` rows), so ``kv_cache_report.py`` tabulates it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_cache_eval import PPL_TOPICS, Session, compare, load_model, next_token_logprobs, texts  # noqa: E402


def continuation_attention(model, ids, n_ctx):
    """Per layer: (kv_heads, n_ctx) attention mass of the continuation's queries on the context keys."""
    import torch

    configs = {id(c): c for c in [model.config] + [layer.self_attn.config for layer in model.model.layers]}
    impl = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = "eager"  # the only implementation that returns attention weights
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        for k, c in configs.items():
            c._attn_implementation = impl[k]
    G = model.config.num_key_value_heads
    return [A[0, :, n_ctx:, :n_ctx].sum(1).view(G, -1, n_ctx).sum(1) for A in out.attentions]


def oracle_selector(mass, n_ctx, recent_fraction):
    import streamlev.hf as slh

    class Oracle(slh.selectors.Selector):
        """Scores = the recorded continuation mass of each context key (0 for later keys)."""

        name = "oracle"
        value_norm = True

        def score(self, state, keys, positions, t_next, *, normalize):
            m = mass[state["info"].index]
            return m.gather(1, positions[0].clamp_max(n_ctx - 1)).unsqueeze(0) * (positions < n_ctx)

    return Oracle(sinks=4, recent_fraction=recent_fraction)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--topics", default=",".join(PPL_TOPICS), help="pydoc_data.topics keys or text-file paths")
    ap.add_argument("--budgets", default="0.0625,0.125,0.25")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    import torch
    import streamlev.hf as slh

    torch.set_num_threads(a.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    tok, model = load_model(a.model, None)
    n = a.context
    win = "_win" if a.model == "gemma3" else ""
    methods = ["oracle_r0", "oracle_r50", f"sl_default_pre{win}", f"sl_streaming_pre{win}"]
    result = dict(model=a.model, context=n, continuation=a.continuation, budgets=[float(b) for b in a.budgets.split(",")],
                  methods=methods, torch=torch.__version__, threads=a.threads, ppl=[], passkey=[], overhead=[], copy=[])
    for name, ids in texts(tok, n + a.continuation, a.topics.split(","))[: a.docs]:
        log(f"[{a.model}] oracle on {name!r}")
        full = Session(model, "full", n, n)
        ref = next_token_logprobs(full, ids, n)
        full_bytes = full.nbytes()
        full.close()
        result["ppl"].append(dict(doc=name, method="full", budget=n, frac=1.0, bytes=full_bytes,
                                  **compare(ref, ref, ids[n:])))
        mass = continuation_attention(model, ids, n)
        for frac in result["budgets"]:
            B = int(frac * n)
            for meth in methods:
                if meth.startswith("oracle"):
                    s = Session(model, "full", B, n)
                    s.cache = slh.make_cache(model, B, oracle_selector(mass, n, 0.5 if meth.endswith("r50") else 0.0),
                                             mode="prefill", sliding="window" if win else "compress").attach(model)
                else:
                    s = Session(model, meth, B, n)
                try:
                    lps = next_token_logprobs(s, ids, n)
                    nb = s.nbytes()
                finally:
                    s.close()
                m = compare(ref, lps, ids[n:])
                result["ppl"].append(dict(doc=name, method=meth, budget=B, frac=frac, bytes=nb, **m))
                log(f"  {meth:24s} B={B:5d} KL={m['kl']:.4f} top1={m['top1']:.3f} ppl={m['ppl']:.3f}")
        Path(a.json).write_text(json.dumps(result, indent=1))
    Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
