"""MiniLM (BERT) forward pass in numpy where every attention head sees only a selected subset of keys.

Used by ``benchmarks/quality.py`` for the end-to-end comparison of key
selectors. The model code (layer norm, GELU, weights, tokenizer, texts) is
imported from ``examples/extract_keys.py`` (whose ``forward`` takes the selector); this module adds the one change:
in each layer and head, the queries attend only to the keys (and values)
chosen by a selector from *that layer's* post-projection keys
``K = X W_k^T + b_k`` (bias included; all-MiniLM-L6-v2 has learned absolute
position embeddings added to its input and no rotary embedding, so these are
exactly the keys the softmax sees). Every token remains a query, so the
mean-pooled sentence embedding is computed over all tokens, as in the full
model.

``random_bert`` builds a tiny BERT with random weights (seeded) of the same
architecture, so the pruning plumbing can be tested without the model files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_keys import (  # noqa: E402
    DOCUMENTS,
    WordPiece,
    default_model_dir,
    forward,
    load_texts,
    load_weights,
    sentence_embedding,
)

__all__ = ["forward_pruned", "random_bert", "load_model", "sentence_embedding", "load_texts", "DOCUMENTS",
           "WordPiece"]


def load_model(model_dir: Path | None = None):
    """(cfg, weights, tokenizer) of all-MiniLM-L6-v2 from the bundled package or ``model_dir``."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    cfg, w = load_weights(model_dir)
    return cfg, w, WordPiece(model_dir / "vocab.txt")


def forward_pruned(ids: np.ndarray, cfg: dict, w: dict, select=None):
    """BERT encoder forward pass (float64) with per-head key selection.

    Parameters
    ----------
    ids : int array of shape (n,)
        Token ids ``[CLS] ... [SEP]``.
    cfg, w : config dict and float64 weights (``load_model``).
    select : callable ``select(layer, head, q, k) -> kept`` or None
        ``q``, ``k`` of shape (n, head_dim) are that head's post-projection
        queries and keys in this (pruned) forward pass; ``kept`` are the key
        indices the head attends to (None = all). ``select=None`` is the full
        model.

    Returns
    -------
    hidden : ndarray of shape (n, hidden_size), the last hidden state.
    """
    # a selector that keeps everything still takes the per-head path, as a pruned model does
    return forward(ids, cfg, w, select=select or (lambda *args: None))[3]


def random_bert(seed: int = 0, *, layers: int = 2, hidden: int = 32, heads: int = 4, vocab: int = 50,
                max_pos: int = 128, intermediate: int = 64):
    """(cfg, weights) of a tiny BERT with random Gaussian weights (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)

    def g(*shape, s=0.2):
        return s * rng.standard_normal(shape)

    cfg = {"num_attention_heads": heads, "hidden_size": hidden, "layer_norm_eps": 1e-12,
           "num_hidden_layers": layers, "max_position_embeddings": max_pos}
    w = {"embeddings.word_embeddings.weight": g(vocab, hidden, s=1.0),
         "embeddings.position_embeddings.weight": g(max_pos, hidden, s=1.0),
         "embeddings.token_type_embeddings.weight": g(2, hidden),
         "embeddings.LayerNorm.weight": 1 + g(hidden, s=0.05), "embeddings.LayerNorm.bias": g(hidden, s=0.05)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for t in ("query", "key", "value"):
            w[p + f"attention.self.{t}.weight"] = g(hidden, hidden, s=1 / np.sqrt(hidden) * 2)
            w[p + f"attention.self.{t}.bias"] = g(hidden, s=0.5)
        w[p + "attention.output.dense.weight"] = g(hidden, hidden, s=1 / np.sqrt(hidden))
        w[p + "attention.output.dense.bias"] = g(hidden, s=0.05)
        w[p + "intermediate.dense.weight"] = g(intermediate, hidden, s=1 / np.sqrt(hidden))
        w[p + "intermediate.dense.bias"] = g(intermediate, s=0.05)
        w[p + "output.dense.weight"] = g(hidden, intermediate, s=1 / np.sqrt(intermediate))
        w[p + "output.dense.bias"] = g(hidden, s=0.05)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"] = 1 + g(hidden, s=0.05)
            w[p + ln + ".bias"] = g(hidden, s=0.05)
    return cfg, w
