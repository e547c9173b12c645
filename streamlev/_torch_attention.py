"""PyTorch LevAttention: multi-head attention over the keys of largest leverage (implementation).

Public names are re-exported by :mod:`streamlev.torch`; this private module
imports torch at import time, so only import it when torch is installed.
"""

from __future__ import annotations

import math
import numbers

import torch  # absolute import: always the third-party package, never streamlev.torch
from torch import nn

from ._constants import DEFAULT_RTOL
from ._validation import check_attention_p, check_bool, check_budget, check_rtol

__all__ = ["LevAttention", "leverage_scores", "select_keys", "lev_attention"]

QR_CHUNK_ELEMS = 1 << 24  # float64 entries per batched QR call (128 MB): bounds causal-mode memory


# ------------------------------------------------------------------ validation
def _check_eps(eps, caller):
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 < float(eps) <= 1.0):
        raise ValueError(f"{caller}: eps must be a number in (0, 1] or None (leverage scores lie in [0, 1]). "
                         f"Got {eps!r}.")
    return float(eps)


def _check_mode(eps, budget, caller):
    eps, budget = _check_eps(eps, caller), check_budget(budget, caller=caller, allow_none=True)
    if eps is None and budget is None:
        raise ValueError(f"{caller}: pass budget= (the budget keys of largest leverage), eps= (keys with leverage "
                         ">= eps), or both (eps capped by a budget). Got neither; for full attention use "
                         "torch.nn.MultiheadAttention or a budget >= the number of keys.")
    return eps, budget


def _check_heads(x, name, caller, ndim=4):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != ndim or not x.is_floating_point():
        raise ValueError(f"{caller}: {name} must be a floating-point tensor of shape (batch, heads, n, head_dim); "
                         f"got dtype {x.dtype}, shape {tuple(x.shape)}.")
    return x


# ------------------------------------------------------------------ leverage
def _scaled64(K):
    """K detached in float64, scaled per leading index by a power of two (max |entry| in [0.5, 1))."""
    K = K.detach().to(torch.float64)
    m = K.abs().amax(dim=(-2, -1), keepdim=True)
    _, e = torch.frexp(m)
    return torch.ldexp(K, -e.to(torch.float64)) if K.numel() else K


def _ridge_qr_scores(A, fro2, rtol):
    """Rows of Q from the QR of [A; sqrt(lam) I], lam = rtol^2 ||A||_F^2: squared norms = ridge leverage.

    A : (P, n, d) float64. The augmented QR is backward stable, so no Gram
    matrix (which squares the condition number) is ever formed.
    """
    P, n, d = A.shape
    out = torch.zeros(P, n, dtype=torch.float64)
    if P == 0 or n == 0 or d == 0:
        return out
    eye = torch.eye(d, dtype=torch.float64)
    step = max(1, QR_CHUNK_ELEMS // ((n + d) * d))
    for s in range(0, P, step):  # chunks bound memory only; every chunk is one batched LAPACK call
        a = A[s : s + step]
        ridge = (rtol * fro2[s : s + step].sqrt())[:, None, None] * eye
        q = torch.linalg.qr(torch.cat([a, ridge], dim=-2), mode="reduced").Q
        out[s : s + step] = q[:, :n, :].square().sum(-1)
    # all-zero key matrix: leverage 0 by definition (as streamlev.reference)
    return torch.where((fro2 > 0)[:, None], out, torch.zeros((), dtype=torch.float64))


def leverage_scores(K, *, causal: bool = False, rtol: float = DEFAULT_RTOL):
    """Exact ridge leverage scores of the keys, batched over leading dimensions, in float64.

    Parameters
    ----------
    K : torch.Tensor of shape (..., n, d)
        Keys (any floating dtype; read detached, converted to float64).
    causal : bool, default=False
        If True, return the leverage of every key w.r.t. each prefix.
    rtol : float, default=1e-13
        Relative ridge, ``lam = (rtol ||K||_F)^2`` (see :mod:`streamlev.reference`).

    Returns
    -------
    tau : torch.Tensor of float64, shape (..., n), or (..., n, n) when ``causal``
        ``tau[..., j] = k_j^T (K^T K + lam I)^{-1} k_j``; when causal,
        ``tau[..., i, j]`` is the leverage of key j in the prefix ``K[..., :i+1, :]``
        (with that prefix's own ridge) for ``j <= i``, and 0 for ``j > i``.

    Notes
    -----
    Computed as the squared row norms of Q in the thin QR of the augmented
    matrix ``[K; sqrt(lam) I]`` (backward stable; equals the SVD reference to
    about ``u cond(K)``). No gradient flows through the scores.

    Cost per leading index: O(n d^2) non-causal; causal solves one QR per
    prefix, O(n^2 d^2) time and O(n^2 d) memory (in chunks of bounded size).
    """
    caller = "streamlev.torch.leverage_scores"
    if not isinstance(K, torch.Tensor) or K.dim() < 2 or not K.is_floating_point():
        raise ValueError(f"{caller}: K must be a floating-point torch.Tensor of shape (..., n, d); got "
                         f"{type(K).__name__} {getattr(K, 'dtype', '')} {tuple(getattr(K, 'shape', ()))}.")
    causal = check_bool(causal, name="causal", caller=caller)
    rtol = check_rtol(rtol, caller=caller, allow_zero=False)
    lead, (n, d) = K.shape[:-2], K.shape[-2:]
    Ks = _scaled64(K).reshape(-1, n, d).cpu()
    if not causal:
        tau = _ridge_qr_scores(Ks, Ks.square().sum((-2, -1)), rtol)
        return tau.reshape(*lead, n).to(K.device)
    # prefix i of every leading index is one problem: rows j > i zeroed (zero rows add nothing to K^T K)
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    Ap = Ks[:, None, :, :] * tril[None, :, :, None]  # (P, n_prefix, n, d)
    fro2 = Ks.square().sum(-1).cumsum(-1)  # (P, n): ||K[:i+1]||_F^2
    tau = _ridge_qr_scores(Ap.reshape(-1, n, d), fro2.reshape(-1), rtol).reshape(-1, n, n)
    return (tau * tril).reshape(*lead, n, n).to(K.device)


def _priority(tau, eps, keep_first, causal):
    """Selection priority: leverage, -inf for keys that may not be kept, +inf for a forced first key."""
    pr = tau.clone()
    if eps is not None:
        pr = torch.where(tau >= eps, pr, torch.full_like(pr, -math.inf))
    if causal:
        n = tau.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=tau.device).triu(1)
        pr = pr.masked_fill(future, -math.inf)
    if keep_first and pr.shape[-1]:
        pr[..., 0] = math.inf
    return pr


def _top(pr, m):
    """First m keys by priority (ties: earlier key first), as sorted indices and a validity mask."""
    order = torch.sort(pr, dim=-1, descending=True, stable=True).indices[..., :m]
    ok = torch.gather(pr, -1, order) > -math.inf
    idx, perm = torch.sort(order, dim=-1)
    return idx, torch.gather(ok, -1, perm)


def select_keys(K, *, budget: int | None = None, eps: float | None = None, causal: bool = False,
                keep_first: bool = False, rtol: float = DEFAULT_RTOL):
    """The keys LevAttention keeps, per leading index, as a boolean mask.

    Parameters
    ----------
    K : torch.Tensor of shape (..., n, d)
    budget : int >= 1, optional
        Keep at most ``budget`` keys: those of largest leverage (ties go to the
        earlier key). With ``eps`` it caps the thresholded set.
    eps : float in (0, 1], optional
        Keep only keys with leverage >= eps (the universal set for x^2
        attention). At least one of ``budget`` and ``eps`` is required.
    causal : bool, default=False
        Per query position i: select among keys 0..i by their leverage in the
        prefix ``K[..., :i+1, :]``.
    keep_first : bool, default=False
        Always keep key 0 (e.g. a CLS token); it counts toward the budget.
    rtol : float, default=1e-13

    Returns
    -------
    kept : torch.Tensor of bool, shape (..., n), or (..., n, n) when causal
        (row i: the keys query i attends to, a subset of 0..i).

    Notes
    -----
    Deterministic: a stable sort orders equal scores by key position. The
    selection is a piecewise-constant function of K and carries no gradient.
    """
    caller = "streamlev.torch.select_keys"
    eps, budget = _check_mode(eps, budget, caller)
    causal = check_bool(causal, name="causal", caller=caller)
    keep_first = check_bool(keep_first, name="keep_first", caller=caller)
    tau = leverage_scores(K, causal=causal, rtol=rtol)
    n = tau.shape[-1]
    m = n if budget is None else min(budget, n)
    idx, ok = _top(_priority(tau, eps, keep_first, causal), m)
    kept = torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
    return kept.scatter(-1, idx, ok)


# ------------------------------------------------------------------ attention
def _attend(q, k, v, mask, p, scale):
    """Attention of q over keys k (all (B, H, *, dh)), restricted to ``mask`` (broadcast to (B, H, nq, nk))."""
    S = q @ k.transpose(-1, -2)
    if p == "softmax":
        Z = torch.where(mask, S * scale, torch.full_like(S, -math.inf))
        mx = Z.detach().amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # rows with no kept key
        W = torch.exp(Z - mx)
    else:
        W = torch.where(mask, S.abs(), torch.zeros_like(S))
        mx = W.detach().amax(-1, keepdim=True)
        # dividing by the (constant) row max keeps |x|^p in range; the normalised weights do not depend on it
        mx = torch.where(mx > 0, mx, torch.ones_like(mx))
        W = (W / mx) ** p
    z = W.sum(-1, keepdim=True)
    A = W / torch.where(z > 0, z, torch.ones_like(z))  # a row with nothing kept (or all scores 0) is zero
    return A @ v, A


def lev_attention(q, k, v, *, budget: int | None = None, eps: float | None = None, p="softmax",
                  scale: float | None = None, causal: bool = False, keep_first: bool = False,
                  rtol: float = DEFAULT_RTOL, need_weights: bool = False):
    """Multi-head attention restricted, per (batch, head), to the keys of largest leverage.

    Parameters
    ----------
    q : torch.Tensor of shape (B, H, n_q, dh)
    k : torch.Tensor of shape (B, H, n, dh)
    v : torch.Tensor of shape (B, H, n, dv)
    budget, eps, causal, keep_first, rtol
        Selection, as in :func:`select_keys` (computed from ``k`` of each (batch, head)).
    p : "softmax" or float >= 1, default="softmax"
        ``softmax(scale q k^T)`` or ``rownorm(|q k^T|^p)`` over the kept keys.
    scale : float, optional
        Softmax temperature, default ``1 / sqrt(dh)``.
    need_weights : bool, default=False
        Also return the attention weights, shape (B, H, n_q, n), zero outside the kept keys.

    Returns
    -------
    out : torch.Tensor of shape (B, H, n_q, dv)
    weights : torch.Tensor of shape (B, H, n_q, n), only when ``need_weights``

    Notes
    -----
    Gradient: the kept set is chosen without gradient (indices are a
    piecewise-constant function of k, so the selection's derivative is zero
    almost everywhere); the attention over the kept keys is differentiable in
    q, k and v as ordinary attention is. With ``budget >= n`` (and no eps) the
    result is full attention and no leverage is computed.

    Batched: non-causal selection gathers the kept keys (scores cost
    O(n_q m dh) for m = min(budget, n) kept keys); causal selection masks the
    (n, n) score matrix, with the prefix selection cost of
    :func:`leverage_scores`. A query with no kept key returns zeros.
    """
    caller = "streamlev.torch.lev_attention"
    eps, budget = _check_mode(eps, budget, caller)
    p, scale = check_attention_p(p, scale, caller=caller, p_min=1.0)
    causal = check_bool(causal, name="causal", caller=caller)
    keep_first = check_bool(keep_first, name="keep_first", caller=caller)
    need_weights = check_bool(need_weights, name="need_weights", caller=caller)
    rtol = check_rtol(rtol, caller=caller, allow_zero=False)
    q, k, v = (_check_heads(x, nm, caller) for x, nm in ((q, "q"), (k, "k"), (v, "v")))
    B, H, n_q, dh = q.shape
    n = k.shape[-2]
    if k.shape[:2] != (B, H) or k.shape[-1] != dh or v.shape[:3] != (B, H, n):
        raise ValueError(f"{caller}: shapes must be q (B, H, n_q, dh), k (B, H, n, dh), v (B, H, n, dv); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if causal and n_q != n:
        raise ValueError(f"{caller}: causal attention needs one query per key (n_q == n); got n_q={n_q}, n={n}.")
    if p == "softmax" and scale is None:
        scale = 1.0 / math.sqrt(dh)
    full = eps is None and budget >= n
    with torch.no_grad():
        if full:
            idx = None
        else:
            tau = leverage_scores(k, causal=causal, rtol=rtol)
            m = n if budget is None else min(budget, n)
            idx, ok = _top(_priority(tau, eps, keep_first, causal), m)
    future = torch.ones(n_q, n, dtype=torch.bool, device=q.device).triu(1) if causal else None
    if idx is None:  # everything kept
        mask = ~future if causal else torch.ones(1, 1, 1, n, dtype=torch.bool, device=q.device)
        out, A = _attend(q, k, v, mask, p, scale)
        A_full = A
    elif causal:  # per-query sets: mask the full score matrix
        mask = torch.zeros(B, H, n_q, n, dtype=torch.bool, device=q.device).scatter(-1, idx, ok) & ~future
        out, A = _attend(q, k, v, mask, p, scale)
        A_full = A
    else:  # one set per (batch, head): gather the kept keys only
        kk = torch.gather(k, 2, idx[..., None].expand(-1, -1, -1, dh))
        vv = torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
        out, A = _attend(q, kk, vv, ok[:, :, None, :], p, scale)
        A_full = None
        if need_weights:
            A_full = torch.zeros(B, H, n_q, n, dtype=A.dtype, device=A.device)
            A_full = A_full.scatter(-1, idx[:, :, None, :].expand(-1, -1, n_q, -1), A)
    return (out, A_full) if need_weights else out


class LevAttention(nn.Module):
    """Drop-in multi-head self/cross attention that attends only to the keys of largest leverage.

    Same inputs, parameters and state_dict layout as
    ``torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)``:
    ``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,), ``out_proj`` (E -> E).
    Per example and head, the projected keys are scored by exact leverage and
    attention (softmax or |x|^p) runs over the kept keys only.

    Parameters
    ----------
    embed_dim : int
    num_heads : int
        Must divide ``embed_dim``.
    budget : int >= 1, optional
        Keys kept per (example, head): the ``budget`` of largest leverage
        (the paper's ViTs used 32 of 197).
    eps : float in (0, 1], optional
        Keep keys with leverage >= eps (the universal set for p = 2), capped
        at ``budget`` if both are given. At least one of the two is required.
    p : "softmax" or float >= 1, default="softmax"
    scale : float, optional
        Softmax temperature (default ``1 / sqrt(head_dim)``).
    keep_first : bool, default=False
        Always keep key 0 (a CLS token); it counts toward the budget.
    causal : bool, default=False
        Default for ``forward(is_causal=...)``.
    bias : bool, default=True
    rtol : float, default=1e-13
        Relative ridge of the leverage definition (as :mod:`streamlev.reference`).

    Notes
    -----
    Guarantee: for every example and head, the keys attended to are exactly
    the top ``budget`` (or thresholded) keys of ``leverage_scores`` of that
    head's projected keys, ties to the earlier key; with ``budget >= n`` the
    output equals ``nn.MultiheadAttention`` with the same weights (softmax).
    The selection carries no gradient (see :func:`lev_attention`); dropout,
    ``attn_mask`` and ``key_padding_mask`` are not supported.

    Causal use: query i attends to keys <= i, chosen by leverage in the prefix
    0..i; that costs O(n^2 d^2) per (example, head), against O(n d^2)
    non-causal.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, budget: int | None = None, eps: float | None = None,
                 p="softmax", scale: float | None = None, keep_first: bool = False, causal: bool = False,
                 bias: bool = True, rtol: float = DEFAULT_RTOL, device=None, dtype=None):
        caller = "LevAttention"
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
                raise ValueError(f"{caller}: {name} must be a positive int. Got {val!r}.")
        if embed_dim % num_heads:
            raise ValueError(f"{caller}: num_heads={num_heads} must divide embed_dim={embed_dim} (each head gets "
                             "embed_dim // num_heads features); choose a divisor.")
        self_eps, self_budget = _check_mode(eps, budget, caller)
        self_p, self_scale = check_attention_p(p, scale, caller=caller, p_min=1.0)
        flags = [check_bool(x, name=nm, caller=caller) for x, nm in ((keep_first, "keep_first"), (causal, "causal"),
                                                          (bias, "bias"))]
        rtol = check_rtol(rtol, caller=caller, allow_zero=False)
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), embed_dim // num_heads
        self.budget, self.eps, self.p, self.scale, self.rtol = self_budget, self_eps, self_p, self_scale, rtol
        self.keep_first, self.causal = flags[0], flags[1]
        fk = {"device": device, "dtype": dtype}
        # Created and initialised in the order nn.MultiheadAttention uses, so the layouts (and inits) match.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk)) if flags[2] else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=flags[2], **fk)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_multihead(cls, mha, **kwargs):
        """A LevAttention with the weights of ``mha`` (a ``torch.nn.MultiheadAttention``); kwargs as ``__init__``.

        Inputs to the result are batch-first whatever ``mha.batch_first`` was.
        Raises ValueError for layouts LevAttention does not have (separate
        k/v dimensions, ``add_bias_kv``).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"LevAttention.from_multihead: expected torch.nn.MultiheadAttention, got "
                            f"{type(mha).__name__}.")
        if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("LevAttention.from_multihead: only packed in-projections (kdim == vdim == embed_dim) "
                             "without add_bias_kv / add_zero_attn are supported.")
        w = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, device=w.device, dtype=w.dtype,
                  **kwargs)
        new.load_state_dict(mha.state_dict())
        return new

    def extra_repr(self) -> str:
        """The selection settings, shown in ``repr(module)``."""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, budget={self.budget}, eps={self.eps}, "
                f"p={self.p!r}, keep_first={self.keep_first}, causal={self.causal}")

    def _project(self, query, key, value):
        caller = "LevAttention.forward"
        key = query if key is None else key
        value = key if value is None else value
        E = self.embed_dim
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != E or not x.is_floating_point():
                raise ValueError(f"{caller}: {name} must be a floating-point tensor of shape (batch, seq, "
                                 f"embed_dim={E}) (batch_first); got {type(x).__name__} "
                                 f"{tuple(getattr(x, 'shape', ()))}.")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"{caller}: key and value must have the same (batch, seq) and query the same batch; "
                             f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}.")
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        B, H, dh = query.shape[0], self.num_heads, self.head_dim

        def heads(x, i):
            y = nn.functional.linear(x, w[i], b[i])
            return y.view(B, x.shape[1], H, dh).transpose(1, 2)  # (B, H, seq, dh)

        return heads(query, 0), heads(key, 1), heads(value, 2)

    def select(self, query, key=None, *, is_causal: bool | None = None):
        """Boolean mask of the keys each (example, head) attends to: (B, H, n) or, causal, (B, H, n, n)."""
        causal = self.causal if is_causal is None else check_bool(is_causal, name="is_causal", caller="LevAttention.select")
        with torch.no_grad():
            _, k, _ = self._project(query, key, None)
            return select_keys(k, budget=self.budget, eps=self.eps, causal=causal, keep_first=self.keep_first,
                               rtol=self.rtol)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights: bool = False,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool | None = None):
        """Attention output ``(out, weights)`` as ``nn.MultiheadAttention(batch_first=True)`` returns it.

        Parameters
        ----------
        query : torch.Tensor of shape (B, n_q, E)
        key, value : torch.Tensor of shape (B, n, E), optional
            Default: ``query`` (self-attention) and ``key``.
        key_padding_mask, attn_mask : must be None (not supported)
        need_weights : bool, default=False
            Return attention weights (zero outside the kept keys), shape
            (B, n_q, n) averaged over heads or (B, H, n_q, n).
        average_attn_weights : bool, default=True
        is_causal : bool, optional
            Override the module's ``causal`` (requires n_q == n).

        Returns
        -------
        out : torch.Tensor of shape (B, n_q, E)
        weights : torch.Tensor or None
        """
        if key_padding_mask is not None or attn_mask is not None:
            raise NotImplementedError("LevAttention.forward: key_padding_mask and attn_mask are not supported "
                                      "(the leverage selection would have to exclude masked keys); pass None and "
                                      "use is_causal=True for causal masking.")
        causal = self.causal if is_causal is None else check_bool(is_causal, name="is_causal", caller="LevAttention.forward")
        q, k, v = self._project(query, key, value)
        res = lev_attention(q, k, v, budget=self.budget, eps=self.eps, p=self.p, scale=self.scale, causal=causal,
                            keep_first=self.keep_first, rtol=self.rtol, need_weights=bool(need_weights))
        out, A = res if need_weights else (res, None)
        B, n_q = query.shape[:2]
        out = self.out_proj(out.transpose(1, 2).reshape(B, n_q, self.embed_dim))
        if A is not None and average_attn_weights:
            A = A.mean(1)
        return out, A
