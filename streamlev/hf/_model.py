"""What the cache needs to know about a decoder: its attention layers, windows, RoPE and query taps.

Everything here reads the model's config and module tree only; no weight is
read or changed, so a model that is not supported is rejected before any
forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SUPPORTED_MODEL_TYPES", "LayerInfo", "inspect_model", "decoder_config"]

# Decoders whose attention is "q/k/v projections, RoPE on q and k, then cache.update"
# (the Llama layout; Gemma 3 adds q/k RMS norms before RoPE). Tested: llama, gemma3_text.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass(frozen=True)
class LayerInfo:
    """Per-layer facts the selectors use (all read from the model, none from the weights)."""

    index: int
    num_heads: int          # query heads
    num_kv_heads: int       # key/value heads (GQA groups)
    head_dim: int
    scaling: float          # the logit scale of the layer (1/sqrt(d), or Gemma's query_pre_attn_scalar**-0.5)
    sliding_window: int | None  # None for full-attention layers
    inv_freq: torch.Tensor  # RoPE inverse frequencies of this layer, shape (head_dim/2,)
    rope_scale: float       # RoPE attention scaling (multiplies cos and sin; 1.0 for default RoPE)


def decoder_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"streamlev.hf: expected a transformers PreTrainedModel (with a .config), got "
                        f"{type(model).__name__}.")
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _decoder(model):
    inner = getattr(model, "model", None)
    inner = getattr(inner, "language_model", inner)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"streamlev.hf: cannot find the decoder layers of {type(model).__name__} "
                         f"(expected model.model.layers).")
    return inner, layers


def inspect_model(model) -> list[LayerInfo]:
    """Check that ``model`` is a supported decoder and return one :class:`LayerInfo` per layer.

    Raises ValueError naming the model type and the supported ones otherwise. Reads
    only the config and module attributes (no forward pass, no weight access).
    """
    cfg = decoder_config(model)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"streamlev.hf: model type {mtype!r} ({type(model).__name__}) is not supported; supported "
                         f"decoder types: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ValueError("streamlev.hf: attention logit soft-capping is not supported (the selectors assume plain "
                         "softmax logits).")
    inner, layers = _decoder(model)
    rot = getattr(inner, "rotary_emb", None)
    if rot is None:
        raise ValueError(f"streamlev.hf: {type(model).__name__} has no rotary embedding module (model.model.rotary_emb);"
                         " only RoPE decoders are supported.")
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(layers)
    uniform_window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "scaling")):
            raise ValueError(f"streamlev.hf: layer {i} of {type(model).__name__} has no q/k/v projections; "
                             "unsupported attention layout.")
        ltype = types[i] if i < len(types) else "full_attention"
        if ltype not in ("full_attention", "sliding_attention"):
            raise ValueError(f"streamlev.hf: layer {i} has attention type {ltype!r}; supported: full_attention, "
                             "sliding_attention.")
        window = getattr(attn, "sliding_window", None)
        if window is None and ltype == "sliding_attention":
            window = uniform_window
        if getattr(cfg, "layer_types", None) is None and mtype in ("mistral", "qwen2"):
            window = uniform_window
        inv = getattr(rot, f"{ltype}_inv_freq", None)
        if inv is None:
            inv = getattr(rot, "inv_freq")
        rscale = getattr(rot, f"{ltype}_attention_scaling", None)
        if rscale is None:
            rscale = getattr(rot, "attention_scaling", 1.0)
        head_dim = int(getattr(attn, "head_dim", None) or cfg.head_dim)
        out.append(LayerInfo(index=i, num_heads=int(cfg.num_attention_heads),
                             num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
                             head_dim=head_dim, scaling=float(attn.scaling),
                             sliding_window=int(window) if window else None,
                             inv_freq=inv.detach().to(torch.float64).cpu(), rope_scale=float(rscale)))
    return out


# Layout of the pre-RoPE query the hooked module outputs: q_proj gives (B, m, H*d); Gemma 3 normalises
# after the transpose, (B, H, m, d); Qwen 3 before it, (B, m, H, d).
_NORM_LAYOUT = {"gemma3_text": "bhmd", "qwen3": "bmhd"}


def query_modules(model):
    """Per layer: the module whose output is the pre-RoPE query, and its layout ("flat", "bhmd" or "bmhd")."""
    _, layers = _decoder(model)
    norm_layout = _NORM_LAYOUT.get(getattr(decoder_config(model), "model_type", None), "bhmd")
    out = []
    for layer in layers:
        norm = getattr(layer.self_attn, "q_norm", None)
        out.append((layer.self_attn.q_proj, "flat") if norm is None else (norm, norm_layout))
    return out
