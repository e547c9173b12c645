"""The torch selectors inside a real generation loop keep exactly what the numpy reference keeps.

The hf cache (issue #18) runs the softmax defaults of issue #16 as batched torch code; this file runs a
tiny random GQA Llama on one prompt longer than the budget and checks, per layer and key/value head, that
the positions the cache keeps equal ``streamlev.selectors.select_softmax`` on the same post-RoPE keys and
queries (float64 reference against the model's float32 tensors).
"""

from __future__ import annotations

import numpy as np
import pytest

from streamlev.selectors import select_softmax
from streamlev.softmax_scores import rope_shift

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
slh = pytest.importorskip("streamlev.hf")

from streamlev.hf._model import inspect_model, query_modules  # noqa: E402  (needs torch)

from .test_hf import VOCAB, _llama  # noqa: E402


def _keys_and_queries(model, ids):
    """Post-RoPE keys (L, G, n, d) from a full cache and pre-RoPE queries (L, H, n, d) from the query taps."""
    taps, hooks = [], []
    infos = inspect_model(model)
    for (mod, layout), info in zip(query_modules(model), infos):
        assert layout == "flat"  # Llama: q_proj output, (B, n, H * d)

        def hook(module, args, out, info=info):
            taps.append(out.detach().view(1, -1, info.num_heads, info.head_dim).transpose(1, 2)[0].double().numpy())
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    keys = [layer.keys[0].double().numpy() for layer in out.past_key_values.layers]
    return keys, taps, infos


@pytest.mark.parametrize("selector,budget", [("observed", 12), ("observed", 20), ("keys", 12), ("keys", 20)])
def test_cache_keeps_what_select_softmax_keeps(selector, budget):
    model = _llama()
    # distinct tokens: a repeated token has the same key norm at every position (RoPE keeps norms), an exact
    # tie that float32 rounding would break differently from the float64 reference
    ids = 3 + torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(5))[None, :48]
    n = ids.shape[1]
    keys, queries, infos = _keys_and_queries(model, ids)
    cache = slh.make_cache(model, budget, selector).attach(model)
    try:
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
    finally:
        cache.detach()
    for i, info in enumerate(infos):
        d, r = info.head_dim, info.num_heads // info.num_kv_heads
        theta = 1.0 / float(info.inv_freq[1]) ** (d / 2)
        q_post = rope_shift(queries[i], np.arange(n), theta)  # RoPE at the observed positions
        for g in range(info.num_kv_heads):
            qs = q_post[g * r:(g + 1) * r] if selector == "observed" else None
            want = select_softmax(keys[i][g], budget, queries=qs, causal=True,
                                  rope_theta=theta if qs is not None else None, scale=info.scaling)
            got = np.sort(cache.kept_positions(i)[0, g].numpy())
            assert got.tolist() == want.tolist(), (i, g)
