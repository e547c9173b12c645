"""PyTorch LevAttention: attention over the keys of largest leverage, trainable (optional extra ``torch``).

* :class:`LevAttention`: a drop-in for ``torch.nn.MultiheadAttention(batch_first=True)``
  (same parameters and state_dict) that, per example and head, attends only to
  the ``budget`` keys of largest leverage, or to the keys with leverage >= eps
  (the universal set for |x|^2 attention), optionally always keeping a CLS token.
* :func:`lev_attention`: the same on already-projected heads (B, H, n, dh).
* :func:`select_keys`, :func:`leverage_scores`: the selection and exact float64
  leverage scores, batched over (batch, heads), causal per prefix.

Why no gradient through the selection: which keys are kept is a piecewise-
constant function of the keys, so its derivative is zero almost everywhere
(and undefined on the switching set). Gradients flow through the attention
over the kept keys, exactly as in full attention restricted to them; this is
the straight choice for training LevAttention models from scratch (as the
paper's ViT experiments do) and needs no surrogate.

Needs torch (``pip install 'streamlev[torch]'``). Without it this module still
imports (so documentation builds), and using any of its names raises an
ImportError that says what to install.
"""

from __future__ import annotations

__all__ = ["LevAttention", "lev_attention", "select_keys", "leverage_scores"]

from ._optional import available, missing_extra

if available("torch"):
    from ._torch_attention import LevAttention, lev_attention, leverage_scores, select_keys
else:  # pragma: no cover - exercised only without the extra
    __getattr__ = missing_extra("streamlev.torch", __all__,
                                "PyTorch: pip install 'streamlev[torch]' (or pip install torch)")
