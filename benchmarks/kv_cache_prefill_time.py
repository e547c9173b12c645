#!/usr/bin/env python3
"""Prefill time of one prompt: a full cache, the default cache, and the default with ``prompt_buffer``.

The three run alternately in one process (``--reps`` rounds), and the medians are printed with their
ratios. Only the prefill is timed (the forward pass that compresses the prompt to the budget).

    HF_HUB_OFFLINE=1 python benchmarks/kv_cache_prefill_time.py --model smollm2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_cache_eval import load_model, texts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=0.125, help="fraction of the context")
    ap.add_argument("--prompt-buffer", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch
    from transformers import DynamicCache

    import streamlev.hf as slh

    torch.set_num_threads(a.threads)
    tok, model = load_model(a.model, None)
    _, ids = texts(tok, a.context, ["typesseq"])[0]
    x = torch.tensor([ids])
    base = slh.selectors.default_selector()
    dense = slh.selectors.ObservedAttention(buffer=base.buffer, stride=base.stride, half_life=base.half_life,
                                            value_norm=base.value_norm, sinks=base.sinks,
                                            recent_fraction=base.recent_fraction, prompt_buffer=a.prompt_buffer)
    rules = {"full": None, "default": base, f"prompt_buffer={a.prompt_buffer}": dense}
    sliding = "window" if a.model == "gemma3" else "compress"
    times = {k: [] for k in rules}
    for _ in range(a.reps):
        for name, sel in rules.items():
            cache = (DynamicCache(config=model.config) if sel is None else
                     slh.make_cache(model, int(a.budget * a.context), sel, sliding=sliding).attach(model))
            t0 = time.perf_counter()
            with torch.no_grad():
                model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times[name].append(time.perf_counter() - t0)
            if sel is not None:
                cache.detach()
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{a.model} {k:22s} prefill {v:.3f} s  ({v / med['full']:.2f} x full, {v / med['default']:.2f} x default)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
