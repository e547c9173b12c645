"""The evaluation protocol of ``benchmarks/softmax_selectors.py``, per key/value head, over several model families.

One :class:`Group` is one key/value head of one layer of one document (or
image): the cache keys it holds, the queries of the ``g`` query heads that
read it, split into *seen* queries (what a selector may summarise) and
*evaluation* queries (what only the oracle sees), and the model structure
(causal or not, sliding window, RoPE base).

Protocol (as in ``benchmarks/softmax_selectors.py``):

* causal decoders: the cache is the prefix ``K[:n0]``, ``n0 = floor(3n/4)``; the
  seen queries are positions ``< n0``; the evaluation queries are positions
  ``>= n0``, each with its softmax over the cache keys it can see (all of them,
  or for a sliding-window layer of window ``w`` the keys ``j > t - w``);
* encoders and vision transformers: the cache is every key; the evaluation
  queries are positions ``i % 4 == 3``, the seen queries the others;
* metric: mean over the group's query heads and evaluation queries of the
  softmax mass of the kept keys; the oracle keeps the top-B column means (the
  best fixed set for these queries, shared by the group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamlev.datasets import load_minilm, load_qkv

FRACS = (1 / 16, 1 / 8, 1 / 4)


@dataclass
class Group:
    family: str
    doc: int
    layer: int
    kv_head: int
    K: np.ndarray  # (N, d) cache keys, post-RoPE
    V: np.ndarray  # (N, d)
    Qseen: np.ndarray  # (g, m, d) post-RoPE
    Qseen_pre: np.ndarray | None  # (g, m, d) pre-RoPE, or None
    seen_pos: np.ndarray  # (m,)
    Qeval: np.ndarray  # (g, me, d)
    eval_pos: np.ndarray  # (me,)
    causal: bool
    window: int | None
    rope_theta: float | None
    col: np.ndarray  # (N,) mean softmax mass per key over heads and evaluation queries

    @property
    def N(self):
        return self.K.shape[0]

    def mass(self, kept):
        return float(self.col[np.asarray(kept, np.int64)].sum())

    def oracle(self, B):
        return float(np.sort(self.col)[::-1][:B].sum())


def kv_groups(sample):
    """Key/value head of every query head: from ``kv_group`` if stored, else heads with identical keys."""
    if "kv_group" in sample.extra:
        return np.asarray(sample.extra["kv_group"], np.int64)
    k = sample.k[0, :, : min(64, sample.n_tokens)]
    out, reps = np.zeros(sample.n_heads, np.int64), []
    for h in range(sample.n_heads):
        for gi, r in enumerate(reps):
            if np.array_equal(k[h], k[r]):
                out[h] = gi
                break
        else:
            reps.append(h)
            out[h] = len(reps) - 1
    return out


def column_mass(Qe, K, eval_pos, window, causal_offset=None):
    """Mean over heads and queries of the softmax over the visible cache keys, shape (N,)."""
    g, me, d = Qe.shape
    N = K.shape[0]
    S = np.einsum("hid,jd->hij", Qe, K) / np.sqrt(d)
    if window:
        j = np.arange(N)
        vis = j[None, :] > (eval_pos[:, None] - window)
        S = np.where(vis[None], S, -np.inf)
    S = S - S.max(-1, keepdims=True)
    P = np.exp(S)
    P /= P.sum(-1, keepdims=True)
    return P.mean(axis=(0, 1))


FAMILY_FILES = {
    "MiniLM": "minilm6.npz",
    "SmolLM2": "smollm2_qkv.npz",
    "ViT-S/14 224px": "vit224.npz",
    "ViT-S/14 448px": "vit448.npz",
    "ViT-S/14 518px": "vit518.npz",  # added later, to confirm the uniform query sample on inputs not used to choose it
    "Gemma3-270M": "gemma3_qkv.npz",
}
CAUSAL = {"SmolLM2", "Gemma3-270M"}


def groups(family, path=None, max_docs=None):
    """Yield every :class:`Group` of one family's archive (the embedded MiniLM sample if ``path`` is None)."""
    s = load_qkv(path, dtype=np.float32) if path else load_minilm(dtype=np.float32)
    causal = family in CAUSAL
    grp = kv_groups(s)
    windows = s.extra.get("sliding_window")
    thetas = s.extra.get("rope_theta")
    qpre = s.extra.get("q_prerope")
    ptr = s.doc_ptr
    nd = len(ptr) - 1 if max_docs is None else min(max_docs, len(ptr) - 1)
    for di in range(nd):
        a, b = int(ptr[di]), int(ptr[di + 1])
        n = b - a
        for li in range(s.n_layers):
            w = None
            if windows is not None and int(np.asarray(windows)[li]) > 0:
                w = int(np.asarray(windows)[li])
            theta = None
            if thetas is not None:
                th = np.asarray(thetas, np.float64)
                theta = float(th) if th.ndim == 0 else float(th[li])
            for kv in range(int(grp.max()) + 1):
                hs = np.flatnonzero(grp == kv)
                Q = np.asarray(s.q[li, hs, a:b], np.float64)
                K = np.asarray(s.k[li, hs[0], a:b], np.float64)
                V = np.asarray(s.v[li, hs[0], a:b], np.float64)
                Qp = None if qpre is None else np.asarray(qpre[li, hs, a:b], np.float64)
                if causal:
                    n0 = (3 * n) // 4
                    seen, ev = np.arange(n0), np.arange(n0, n)
                    Kc, Vc = K[:n0], V[:n0]
                else:
                    ev_mask = np.arange(n) % 4 == 3
                    seen, ev = np.flatnonzero(~ev_mask), np.flatnonzero(ev_mask)
                    Kc, Vc = K, V
                col = column_mass(Q[:, ev], Kc, ev, w if causal else None)
                yield Group(family, di, int(s.layers[li]), kv, Kc, Vc, Q[:, seen],
                            None if Qp is None else Qp[:, seen], seen, Q[:, ev], ev, causal,
                            w if causal else None, theta, col)
