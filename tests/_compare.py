"""Comparison of a sketch with the exact reference, away from near-ties."""

import numpy as np

from streamlev import reference as ref
from streamlev.testing import score_tolerance


def assert_matches_reference(sk, K, ids=None, eps_list=None):
    """Sketch's universal sets and scores agree with the SVD reference on K (rows labelled by ids)."""
    K = np.asarray(K, dtype=np.float64)
    ids = np.arange(K.shape[0]) if ids is None else np.asarray(ids)
    tau = ref.leverage_scores(K) if K.shape[0] else np.zeros(0)
    tol = score_tolerance(K)
    assert sk.n == K.shape[0]
    assert sk.num_retained <= type(sk).max_retained(sk.d, sk.eps)
    got_ids, got_tau = sk.scores()
    # every retained score matches the exact one
    pos = {int(i): k for k, i in enumerate(ids)}
    idx = np.array([pos[int(i)] for i in got_ids], dtype=np.int64)
    if idx.size:
        np.testing.assert_allclose(got_tau, tau[idx], rtol=1e-9, atol=tol)
    for e in eps_list or [sk.eps]:
        U = set(sk.universal_set(e).tolist())
        for j in range(K.shape[0]):
            if abs(tau[j] - e) <= tol:
                continue  # near-tie: either answer is within the documented accuracy
            assert (int(ids[j]) in U) == (tau[j] >= e), (j, tau[j], e)


def loop_attention(Q, K, V, p, scale=None, causal=False, kept_rows=None):
    """Plain per-query loop: attention of query i over the keys it sees (and keeps)."""
    out = np.zeros((Q.shape[0], V.shape[1]))
    for i in range(Q.shape[0]):
        cols = np.arange(i + 1 if causal else K.shape[0])
        if kept_rows is not None:
            cols = np.intersect1d(cols, kept_rows[i])
        if cols.size == 0:
            continue
        s = K[cols] @ Q[i]
        if p == "softmax":
            w = np.exp(scale * s - np.max(scale * s))
        else:
            w = np.abs(s) ** p
        if w.sum() > 0:
            out[i] = w @ V[cols] / w.sum()
    return out
