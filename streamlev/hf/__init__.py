"""Hugging Face transformers integration: KV-cache compression inside a real generation loop (extra ``hf``).

    with streamlev.hf.compress(model, budget=256, selector="default"):
        out = model.generate(input_ids, max_new_tokens=64)

keeps every layer's KV cache within ``budget`` keys per key/value head, at
prefill and while decoding (:mod:`streamlev.hf.cache`). Selectors
(:mod:`streamlev.hf.selectors`): the default (observed attention of 64 recent
queries weighted by the value norm), expected attention under a Gaussian model
of the pre-RoPE queries, the issue-16 defaults ``"observed"`` and ``"keys"``,
KeyDiff, and the guarantee mode ``selector="leverage"`` (the exact |x|^2
universal set). Measured end to end in ``docs/kv_cache.md``.
``mode="append_only"`` decides keep or skip once per arriving token and never
rewrites the cache; ``mode="prefill"`` compresses the prompt only and lets
full-attention layers grow while decoding (kvpress's prefill form). Needs ``pip install 'streamlev[hf]'`` (torch, transformers).
"""

from __future__ import annotations

__all__ = ["compress", "make_cache", "StreamlevCache", "CompressedLayer", "ExactLeverageSet", "selectors",
           "SUPPORTED_MODEL_TYPES"]

from .._optional import available, missing_extra

if available("torch", "transformers"):
    from . import selectors
    from ._model import SUPPORTED_MODEL_TYPES
    from .cache import CompressedLayer, StreamlevCache
    from .compress import compress, make_cache
    from .guarantee import ExactLeverageSet
else:  # pragma: no cover - exercised only without the extra
    __getattr__ = missing_extra("streamlev.hf", __all__, "torch and transformers: pip install 'streamlev[hf]'")
