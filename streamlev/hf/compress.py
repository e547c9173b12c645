"""``compress(model, budget=..., selector=...)``: a context manager that compresses the KV cache of a decoder."""

from __future__ import annotations

import functools
import math
import numbers
from contextlib import contextmanager

from ._model import inspect_model
from .cache import StreamlevCache
from .selectors import make_selector

__all__ = ["compress", "make_cache", "resolve_budget"]

MODES = ("evict", "append_only", "prefill")


def resolve_budget(budget, context: int | None = None) -> int | float:
    """Validate ``budget``: an int >= 1 (keys per head), or a fraction in (0, 1] of the prompt length.

    Parameters
    ----------
    budget : int or float
        Keys per layer and key/value head, or a fraction of the context.
    context : int, optional
        Context length; with it a fraction is resolved and a budget above it raises.

    Returns
    -------
    int or float
        The int budget (or the fraction, when no context is given).
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"streamlev.hf: budget must be an int (keys kept per head) or a float fraction of the "
                        f"context in (0, 1]; got {budget!r} ({type(budget).__name__}).")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"streamlev.hf: budget must be >= 1 key per head, got {budget}.")
        out = int(budget)
    else:
        if not (0.0 < float(budget) <= 1.0) or not math.isfinite(budget):
            raise ValueError(f"streamlev.hf: a float budget is a fraction of the context and must be in (0, 1]; "
                             f"got {budget!r}.")
        if context is None:
            return float(budget)
        out = max(1, int(float(budget) * context))
    if context is not None and out > context:
        raise ValueError(f"streamlev.hf: budget {out} is larger than the context ({context} tokens); nothing would "
                         "be compressed. Use a budget <= the context length (or a fraction).")
    return out


def _check_args(selector, mode, eps, sliding="compress"):
    if sliding not in ("compress", "window"):
        raise ValueError(f"streamlev.hf: sliding must be 'compress' or 'window', got {sliding!r}.")
    if mode not in MODES:
        raise ValueError(f"streamlev.hf: mode must be one of {MODES}, got {mode!r}.")
    if selector == "leverage":
        if mode == "prefill":
            raise ValueError("streamlev.hf: mode='prefill' applies to the softmax selectors; the guarantee mode "
                             "(selector='leverage') keeps the universal set of every key seen (mode='evict').")
        return None
    if eps is not None:
        raise ValueError("streamlev.hf: eps applies to the guarantee mode only (selector='leverage').")
    return make_selector(selector)


def make_cache(model, budget: int, selector="default", *, mode: str = "evict", eps: float | None = None,
               stats_interval: int = 32, evict_every: int = 16, sliding: str = "compress") -> StreamlevCache:
    """A :class:`StreamlevCache` for ``model`` with an int budget (validated before any weight is used).

    Parameters
    ----------
    model : transformers PreTrainedModel
        A supported RoPE decoder.
    budget : int
        Keys kept per layer and key/value head.
    selector : str or Selector
        As in :func:`compress`; ``"leverage"`` is the guarantee mode: each head
        keeps the exact |x|^2 universal set ``{j : tau_j >= eps}`` of the keys it
        has seen, ``eps`` defaulting to ``head_dim / budget`` (so ``|U| <= budget``).
    mode, eps, sliding
        As in :func:`compress`.
    stats_interval, evict_every : int
        See :class:`streamlev.hf.cache.CompressedLayer`.

    Returns
    -------
    StreamlevCache
        Not attached: call ``.attach(model)`` for selectors that use queries.
    """
    infos = inspect_model(model)
    sel = _check_args(selector, mode, eps, sliding)
    budget = resolve_budget(budget)
    if not isinstance(budget, int):
        raise TypeError("streamlev.hf.make_cache: needs an int budget (a fraction is resolved by compress() from "
                        "the prompt length).")
    if sel is None:
        sliding = [i.index for i in infos if i.sliding_window is not None]
        if sliding:
            raise ValueError(f"streamlev.hf: the guarantee mode (selector='leverage') supports full-attention layers "
                             f"only; layers {sliding} use a sliding window, whose universal set is not monotone.")
        d = infos[0].head_dim
        eps = d / budget if eps is None else float(eps)
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"streamlev.hf: the guarantee mode needs eps = head_dim / budget <= 1, i.e. a budget "
                             f">= head_dim = {d}; got budget {budget} (eps {eps}).")
        if eps * budget < d:
            raise ValueError(f"streamlev.hf: eps={eps} lets the universal set reach d/eps = {d / eps:.0f} > budget "
                             f"{budget} keys; use eps >= head_dim / budget = {d / budget}.")
    return StreamlevCache(infos, budget, sel, mode=mode, eps=eps, stats_interval=stats_interval,
                          evict_every=evict_every, sliding=sliding)


def _prompt_length(args, kwargs) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None or not hasattr(ids, "shape") or len(ids.shape) < 2:
        return None
    return int(ids.shape[1])


@contextmanager
def compress(model, budget, selector="default", *, mode: str = "evict", eps: float | None = None,
             stats_interval: int = 32, evict_every: int = 16, sliding: str = "compress"):
    """Compress the KV cache of ``model`` inside the block: ``model.generate`` and ``model(...)`` use a budget.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A RoPE decoder (Llama, Mistral, Qwen2/3, Gemma 3 text); checked on entry.
    budget : int or float
        Keys kept per layer and key/value head; a float in (0, 1] is a fraction of
        the prompt length of each call.
    selector : str or Selector, default "default"
        ``"default"`` (observed attention of 64 queries spread over the last 512
        positions, weighted by the value norm, plus 4 sinks and the newest half
        of the budget: :func:`streamlev.hf.selectors.default_selector`),
        ``"expected_attention"`` (Gaussian query statistics), ``"observed"``
        (the issue-16 query default: observed attention of the newest 512 queries),
        ``"keys"`` (the issue-16 key-only default), ``"keydiff"``, ``"knorm"``,
        ``"streaming"``, ``"leverage"`` (guarantee mode), or a
        :class:`streamlev.hf.selectors.Selector`.
    mode : {"evict", "append_only", "prefill"}, default "evict"
        ``"evict"`` keeps every layer within the budget at every step;
        ``"append_only"`` decides keep or skip once per arriving token (paged
        caches); ``"prefill"`` compresses multi-token blocks only and lets
        full-attention layers grow by one key per decoded token (kvpress's
        prefill presses).
    eps : float, optional
        Guarantee mode threshold (default ``head_dim / budget``).
    sliding : {"compress", "window"}, default "compress"
        Whether sliding-window layers are compressed to the budget too, or kept as
        their window (transformers' own bound).

    Yields
    ------
    A holder whose ``.cache`` is the last :class:`StreamlevCache` created.

    Notes
    -----
    Inside the block, a ``generate`` or forward call without ``past_key_values``
    gets a fresh :class:`StreamlevCache`; one that passes a cache must pass a
    ``StreamlevCache`` (TypeError otherwise). The model type, the budget (against
    ``prompt + max_new_tokens`` for generate, the prompt for a forward call) and
    padding are checked before the model runs. Batches must not be padded.
    """
    inspect_model(model)
    _check_args(selector, mode, eps, sliding)
    resolve_budget(budget)
    holder = type("CompressHandle", (), {"cache": None})()
    orig_generate, orig_forward = model.generate, model.forward

    def new_cache(prompt_len, context):
        b = resolve_budget(budget, prompt_len) if isinstance(budget, float) else resolve_budget(budget, context)
        cache = make_cache(model, b, selector, mode=mode, eps=eps, stats_interval=stats_interval,
                           evict_every=evict_every, sliding=sliding).attach(model)
        holder.cache = cache
        return cache

    def check(args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, StreamlevCache):
            raise TypeError(f"streamlev.hf.compress: past_key_values must be a StreamlevCache inside compress() "
                            f"(or None for a fresh one); got {type(cache).__name__}.")
        n, mask = _prompt_length(args, kwargs), kwargs.get("attention_mask")
        if getattr(mask, "ndim", 0) == 2 and not bool(mask.all()):
            raise ValueError("streamlev.hf.compress: padded batches are not supported (attention_mask has zeros); "
                             "compress one sequence at a time or batch equal-length prompts.")
        return cache, n

    @functools.wraps(orig_generate)
    def generate(*args, **kwargs):
        cache, n = check(args, kwargs)
        if cache is None and n is not None:
            gc = kwargs.get("generation_config") or model.generation_config
            new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None)) or 0
            kwargs["past_key_values"] = new_cache(n, n + int(new))
        return orig_generate(*args, **kwargs)

    @functools.wraps(orig_forward)
    def forward(*args, **kwargs):
        cache, n = check(args, kwargs)
        if cache is None and n is not None and kwargs.get("use_cache", True) is not False:
            kwargs["past_key_values"] = new_cache(n, n)
        return orig_forward(*args, **kwargs)

    model.generate, model.forward = generate, forward
    try:
        yield holder
    finally:
        del model.generate, model.forward
        if holder.cache is not None:
            holder.cache.detach()
