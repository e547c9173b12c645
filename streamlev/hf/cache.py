"""A transformers ``Cache`` that keeps each layer's keys within a budget, at prefill and while decoding.

Positions: the cached keys carry RoPE already (applied by the model before
``update``), so dropping keys never changes the rotation of the others. The
cache reports the number of tokens *seen* as its sequence length, so that
``generate`` assigns the right positions to new tokens, and reports mask sizes
``(kept + new, seen - kept)`` so that every kept key is visible to every new
query (the kept keys of a full-attention layer are all in a query's past).

Per layer, three regimes (``mode="evict"``):

* while everything fits (kept + new <= budget): exactly ``DynamicLayer``
  (concatenate), so with a budget >= the context the model's outputs are
  bit-identical to the full cache;
* one arriving token on a full cache: it is attended, then the keys that
  arrived since the last eviction are scored (one batch) and the cache is cut
  to ``budget + 1 - k`` keys, so the next ``k - 1`` tokens cost exactly a
  DynamicLayer step (``k = evict_every``, at most budget/8);
* several arriving tokens (prefill, a question appended to a compressed
  context): all are attended, then the best ``budget`` keys are kept.

``mode="append_only"`` decides keep or skip once for each arriving token and
never rewrites a kept entry (paged caches); see :class:`CompressedLayer`.
``mode="prefill"`` compresses multi-token blocks only (the prompt, a question
appended later) and appends decoded tokens to full-attention layers, which then
grow past the budget: what kvpress's prefill presses do.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ._model import query_modules
from .guarantee import ExactLeverageSet
from .selectors import Selector

__all__ = ["StreamlevCache", "CompressedLayer"]

_NEG, _POS = float("-inf"), float("inf")


class CompressedLayer(CacheLayerMixin):
    """One layer's compressed cache: keys/values (B, G, n, d) with their original positions (B, G, n).

    Parameters
    ----------
    info : streamlev.hf._model.LayerInfo
    budget : int
        Keys kept per (batch, key/value head) between steps; a sliding-window
        layer keeps at most ``min(budget, window - 1)``, all inside its window.
    selector : Selector or None
        Scoring rule; None selects the guarantee mode (``eps`` required).
    mode : {"evict", "append_only", "prefill"}
        ``"prefill"``: as ``"evict"`` for multi-token blocks, but a decoded token
        is appended to a full-attention layer without eviction (it grows by one key
        per token; sliding-window layers still keep ``cap``).
    eps : float, optional
        Guarantee mode threshold.
    sliding : {"compress", "window"}
        ``"window"`` leaves sliding-window layers as transformers keeps them (their
        window, not the budget, bounds them) and compresses full-attention layers only.
    stats_interval : int
        Buffered queries (one per layer call) before they are folded into the statistics.
    evict_every : int
        While decoding on a full cache, evict in batches: every ``k = min(evict_every,
        cap // 8)`` tokens, score the ``k`` keys that arrived and keep ``cap + 1 - k``
        keys, so the cache stays within ``cap`` (it averages ``cap - k/2``) and the
        other steps cost what a DynamicLayer step costs.

    Notes
    -----
    Guarantees (tested): at most ``budget`` kept keys per head between steps (in
    ``"prefill"`` mode: after each multi-token block; decoded tokens add one each); the first
    ``sinks`` positions are kept while they are inside the layer's window;
    a sliding-window layer never holds a key its next query cannot see;
    ``append_only`` never changes an entry once written (decisions are per
    token, shared by the key/value heads of the layer, batch size 1); guarantee
    mode keeps every key of the exact universal set ``{j : tau_j(K_h) >= eps}``
    of each head h (K_h all keys seen by the head), and exactly that set for
    the heads with the largest set (dense tensors need equal counts per head:
    the others are padded with their next-highest-leverage keys).
    """

    is_compileable = False

    def __init__(self, info, budget: int, selector: Selector | None, *, mode: str = "evict",
                 eps: float | None = None, stats_interval: int = 32, evict_every: int = 16,
                 queries: list | None = None, sliding: str = "compress"):
        super().__init__()
        self.info, self.selector, self.mode, self.eps = info, selector, mode, eps
        self.window = info.sliding_window
        self.is_sliding = self.window is not None
        self.budget = int(budget)
        self.cap = min(self.budget, self.window - 1) if self.is_sliding else self.budget
        # a window no larger than the budget needs no selection: exactly DynamicSlidingWindowLayer
        # (which only frees entries that left the window, so it is append-only too)
        self.passthrough = self.is_sliding and selector is not None and (self.budget >= self.window - 1
                                                                          or sliding == "window")
        self.cumulative_length = 0
        self.pos = self.score = None
        self.stats_interval = int(stats_interval)
        self.evict_every = max(1, min(int(evict_every), self.cap // 8))
        self.queries = queries if queries is not None else []
        self.state = selector.new_state(info) if selector is not None else None
        self.lev = None
        self.threshold = None  # append-only admission threshold (softmax selectors)
        self.overflow = 0      # append-only: tokens that passed the rule but found the cache full

    # ------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        B, G = key_states.shape[:2]
        self.pos = torch.zeros(B, G, 0, dtype=torch.long, device=self.device)
        if self.selector is None:
            self.lev = ExactLeverageSet(B * G, key_states.shape[-1], self.eps, device=self.device)
        if self.mode == "append_only" and B != 1:
            raise ValueError(f"streamlev.hf: mode='append_only' decides per token and supports batch size 1; "
                             f"got batch size {B}.")
        self.is_initialized = True

    @property
    def n(self) -> int:
        """Kept keys per head (<= budget)."""
        return self.keys.shape[2] if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_cache_shape(self) -> int:
        return self.window if self.passthrough else -1

    def get_mask_sizes(self, cache_position):
        q = cache_position.shape[0]
        if self.passthrough:  # exactly DynamicSlidingWindowLayer
            full = self.cumulative_length >= self.window
            off = max(self.cumulative_length - self.window + 1, 0)
            return (self.window - 1 + q if full else self.cumulative_length + q), off
        n = self.n
        return n + q, self.cumulative_length - n

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, G, m, _ = key_states.shape
        t0 = self.cumulative_length
        self.cumulative_length += m
        new_pos = torch.arange(t0, t0 + m, device=self.device).expand(B, G, m)
        if self.selector is not None:
            self.selector.observe_keys(self.state, key_states)
        if self.passthrough:
            self.queries.clear()  # a window needs no selection: its queries are not kept
            k, v = torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
            p = torch.cat([self.pos, new_pos], dim=-1)
            self.keys, self.values, self.pos = (x[:, :, -self.window + 1:] for x in (k, v, p))
            return k, v
        if self.selector is None:
            return self._update_guarantee(key_states, value_states, new_pos)
        if self.mode == "append_only":
            return self._update_append(key_states, value_states, new_pos)
        n = self.keys.shape[2]
        if self.queries and (len(self.queries) > self.stats_interval or self.state.get("frozen")):
            self._stats()  # bound the query buffer while nothing is evicted
        # prefill mode: a decoded token on a full-attention layer is appended (the layer grows past the budget)
        grow = self.mode == "prefill" and m == 1 and not self.is_sliding
        if grow or n + m <= self.cap:  # everything fits: exactly DynamicLayer (plus positions and placeholder scores)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.pos = torch.cat([self.pos, new_pos], dim=-1)
            if self.score is not None and not self.selector.rescore:  # a rescoring rule never reads old scores
                self.score = torch.cat([self.score, torch.full(new_pos.shape, _POS, device=self.device)], dim=-1)
            return self.keys, self.values
        return self._evict(key_states, value_states, new_pos, t0)

    # ------------------------------------------------------------------ evict mode
    def _stats(self, force=False):
        if self.state.get("frozen"):  # the selector keeps no more queries: drop the buffered ones
            self.queries.clear()
            return
        if self.selector.uses_queries and self.queries and (force or len(self.queries) >= self.stats_interval):
            self.selector.observe_queries(self.state, self.queries, self.cumulative_length)
            self.queries.clear()

    def _protected(self, pos, score, t_query, horizon=1):
        """Effective scores: +inf for sinks and recent keys, -inf for keys that leave the window within ``horizon``."""
        sinks, recent = self.selector.split(self.budget)
        if not (sinks or recent or self.is_sliding):
            return score
        keep = pos < sinks
        if recent:
            keep = keep | (pos > t_query - 1 - recent)
        eff = torch.where(keep, _POS, score)
        if self.is_sliding:
            eff = torch.where(pos < t_query + horizon - 1 - self.window + 1, _NEG, eff)
        return eff

    def _evict(self, key_states, value_states, new_pos, t0):
        """The block does not fit: attend to everything, then keep the best keys.

        A multi-token block rescores every candidate and keeps ``cap``. One decoded
        token on a full cache scores only the keys that arrived since the last
        eviction (their scores were +inf placeholders) and keeps ``cap + 1 - k``
        (``k = evict_every``), so the next ``k - 1`` tokens are appended as in
        DynamicLayer and the cache never holds more than ``cap`` keys between steps.
        """
        m = key_states.shape[2]
        k = torch.cat([self.keys, key_states], dim=-2)
        v = torch.cat([self.values, value_states], dim=-2)
        p = torch.cat([self.pos, new_pos], dim=-1)
        t_next = t0 + m
        if m > 1 or self.score is None or self.selector.rescore:
            self._stats(force=True)
            score = self.selector.weigh(self.selector.score(self.state, k, p, t_next, normalize=True), v)
            target, horizon = (self.cap, 1) if m > 1 or self.score is None else \
                (self.cap + 1 - self.evict_every, self.evict_every)
        else:
            self._stats()
            score = torch.cat([self.score, torch.full(new_pos.shape, _POS, device=self.device)], dim=-1)
            new = torch.isinf(score) & (score > 0)
            B, G = score.shape[:2]
            u = int(new[0, 0].sum())
            kn = k[new.unsqueeze(-1).expand_as(k)].view(B, G, u, -1)
            vn = v[new.unsqueeze(-1).expand_as(v)].view(B, G, u, -1)
            sn = self.selector.score(self.state, kn, p[new].view(B, G, u), t_next, normalize=False)
            score.masked_scatter_(new, self.selector.weigh(sn, vn).to(score.dtype))
            target, horizon = self.cap + 1 - self.evict_every, self.evict_every
        eff = self._protected(p, score, t_next, horizon)
        # only a sliding window marks keys with _NEG; elsewhere every candidate may be kept (n + m > target)
        keep = max(0, min(target, int((eff > _NEG).sum(-1).min()))) if self.is_sliding else target
        idx = eff.topk(keep, dim=-1).indices.sort(dim=-1).values
        self.keys = k.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1]))
        self.values = v.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
        self.pos, self.score = p.gather(2, idx), score.gather(2, idx)
        return k, v

    # ------------------------------------------------------------------ append-only mode
    def _update_append(self, key_states, value_states, new_pos):
        """Keep or skip each arriving token once; kept entries are never rewritten.

        Until the budget is first exceeded every token is kept. The first block
        that does not fit (usually the prompt) keeps its sinks, its recent split
        and the best of the rest so that ``budget - budget // 4`` entries are used,
        leaving a quarter for later tokens; the lowest score kept by score becomes
        the admission threshold. Later tokens are kept iff their score (the
        largest over the layer's key/value heads) reaches it and room is left.
        """
        k = torch.cat([self.keys, key_states], dim=-2)
        v = torch.cat([self.values, value_states], dim=-2)
        n, m = self.keys.shape[2], key_states.shape[2]
        if self.threshold is None and n + m <= self.cap:
            return self._append(k, v, key_states, value_states, new_pos, torch.ones(m, dtype=torch.bool, device=self.device))
        self._stats(force=True)
        t_next = self.cumulative_length
        s = self.selector.weigh(self.selector.score(self.state, k, torch.cat([self.pos, new_pos], dim=-1), t_next,
                                                    normalize=self.threshold is None), v)[:, :, n:]  # among the held
        s = s.amax(dim=1)[0]  # token score: best over key/value heads, (m,)
        pos = new_pos[0, 0]
        if self.threshold is None:  # first block that overflows: a one-shot selection inside it
            target = max(0, self.cap - self.cap // 4 - n)
            sinks, recent = self.selector.split(self.budget)
            forced = (pos < sinks) | (pos > t_next - 1 - recent)
            rest = max(0, target - int(forced.sum()))
            cand = torch.where(forced, _NEG, s)
            top = cand.topk(min(rest, m), dim=-1).indices
            admit = forced.clone()
            admit[top] = True
            admit &= torch.cumsum(admit.long(), 0) <= target
            self.threshold = float(s[top].min()) if top.numel() else _POS
        else:
            admit = s >= self.threshold
            room = self.cap - n
            over = torch.cumsum(admit.long(), 0) > room
            self.overflow += int((admit & over).sum())
            admit &= ~over
        return self._append(k, v, key_states, value_states, new_pos, admit)

    def _append(self, k, v, key_states, value_states, new_pos, admit):
        idx = admit.nonzero().flatten()
        if idx.numel():
            self.keys = torch.cat([self.keys, key_states[:, :, idx]], dim=-2)
            self.values = torch.cat([self.values, value_states[:, :, idx]], dim=-2)
            self.pos = torch.cat([self.pos, new_pos[:, :, idx]], dim=-1)
        if self.is_sliding:  # entries the next query cannot see are freed (not rewritten): a window's pages
            live = self.pos[0, 0] >= self.cumulative_length - self.window + 1
            if not bool(live.all()):
                self.keys, self.values, self.pos = self.keys[:, :, live], self.values[:, :, live], self.pos[:, :, live]
        return k, v

    # ------------------------------------------------------------------ guarantee mode
    def _update_guarantee(self, key_states, value_states, new_pos):
        B, G, m, d = key_states.shape
        k = torch.cat([self.keys, key_states], dim=-2)
        v = torch.cat([self.values, value_states], dim=-2)
        flat = key_states.reshape(B * G, m, d)
        if self.mode == "append_only":
            tau = self.lev.prefix_leverage(flat).reshape(B, G, m)
            admit = (tau >= self.eps).any(dim=1)[0]
            room = self.cap - self.keys.shape[2]
            over = torch.cumsum(admit.long(), 0) > room
            self.overflow += int((admit & over).sum())
            return self._append(k, v, key_states, value_states, new_pos, admit & ~over)
        self.lev.observe(flat)
        p = torch.cat([self.pos, new_pos], dim=-1)
        tau = self.lev.leverage(k.reshape(B * G, -1, d)).reshape(B, G, -1)
        keep = int((tau >= self.eps).sum(-1).max())
        if keep > self.cap:
            raise RuntimeError(f"streamlev.hf: universal set of {keep} keys exceeds the budget {self.cap} "
                               f"(eps={self.eps} must be >= head_dim / budget).")
        idx = tau.topk(keep, dim=-1).indices.sort(dim=-1).values
        self.score = tau.gather(2, idx).float()
        self.keys = k.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
        self.values = v.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
        self.pos = p.gather(2, idx)
        return k, v

    # ------------------------------------------------------------------ inspection
    def kept_positions(self) -> torch.Tensor:
        """Original positions (B, G, n) of the keys kept between steps, sorted."""
        if not self.is_initialized:
            return torch.zeros(0, 0, 0, dtype=torch.long)
        return self.pos.sort(dim=-1).values

    @property
    def nbytes(self) -> int:
        """Bytes held: kept keys, values, positions, scores and the selector / sketch state."""
        total = 0
        for t in (self.keys, self.values, self.pos, self.score):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        if self.lev is not None:
            total += self.lev.nbytes
        for val in (self.state or {}).values():
            if isinstance(val, torch.Tensor):
                total += val.numel() * val.element_size()
        total += sum(q.numel() * q.element_size() for q in self.queries)
        return total

    def _unsupported(self, what):
        raise NotImplementedError(f"streamlev.hf.StreamlevCache does not support {what} (it would need the "
                                  "positions and scores to follow); use a DynamicCache for beam search / cropping.")

    def crop(self, max_length):
        self._unsupported("crop")

    def reorder_cache(self, beam_idx):
        self._unsupported("beam search (reorder_cache)")

    def batch_repeat_interleave(self, repeats):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")


class StreamlevCache(Cache):
    """A ``Cache`` whose layers keep at most ``budget`` keys each (see :class:`CompressedLayer`).

    Build it with :func:`streamlev.hf.compress` (which also feeds it the
    queries), or directly and pass it as ``past_key_values``; selectors that use
    query statistics then need :meth:`attach`.
    """

    def __init__(self, infos, budget, selector, *, mode="evict", eps=None, stats_interval=32, evict_every=16,
                 sliding="compress"):
        self.query_buffers = [[] for _ in infos]
        layers = [CompressedLayer(info, budget, selector, mode=mode, eps=eps, stats_interval=stats_interval,
                                  evict_every=evict_every, queries=self.query_buffers[i], sliding=sliding)
                  for i, info in enumerate(infos)]
        super().__init__(layers=layers)
        self.budget, self.selector, self.mode, self.eps = budget, selector, mode, eps
        self._hooks = []

    def attach(self, model):
        """Register forward hooks that buffer each layer's pre-RoPE queries for the selector; returns self."""
        self.detach()
        uses = self.selector is not None and self.selector.uses_queries
        if not uses:
            return self
        for i, (mod, layout) in enumerate(query_modules(model)):
            H, d = self.layers[i].info.num_heads, self.layers[i].info.head_dim

            def hook(module, args, out, buf=self.query_buffers[i], layout=layout, H=H, d=d):
                q = out.detach()
                if layout == "flat":
                    q = q.view(q.shape[0], q.shape[1], H, d)
                buf.append(q if layout == "bhmd" else q.transpose(1, 2))  # (B, H, m, d)
            self._hooks.append(mod.register_forward_hook(hook))
        return self

    def detach(self):
        """Remove the query hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Original positions (B, G, n) kept by one layer."""
        return self.layers[layer_idx].kept_positions()

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers (kept tensors and selector / sketch state)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def overflow(self) -> int:
        """Append-only mode: tokens that passed the admission rule but found their layer full."""
        return sum(layer.overflow for layer in self.layers)
