"""streamlev.torch: LevAttention against plain per-(batch, head) loops, exact leverage, gradcheck, causal prefixes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import streamlev as sl
from streamlev.testing import key_matrices, score_tolerance

from ._compare import loop_attention

torch = pytest.importorskip("torch")
slt = pytest.importorskip("streamlev.torch")


def test_import_resolves_to_pytorch():
    import streamlev._torch_attention as impl

    assert impl.torch.__name__ == "torch" and hasattr(impl.torch, "linalg")  # not streamlev.torch
    assert slt.LevAttention is impl.LevAttention


def test_without_torch_the_module_imports_and_names_say_what_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import streamlev, streamlev.torch as t\n"
            "try:\n    t.LevAttention\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "pip install 'streamlev[torch]'" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ plain references
def _loop_select(K, budget=None, eps=None, keep_first=False):
    """Kept key ids of one (n, d) key matrix from streamlev's exact numpy leverage (float64)."""
    tau = sl.leverage_scores(K)
    n = tau.size
    pr = np.where(tau >= eps, tau, -np.inf) if eps is not None else tau.copy()
    if keep_first:
        pr[0] = np.inf
    order = np.lexsort((np.arange(n), -pr))[: n if budget is None else min(budget, n)]
    return np.sort(order[pr[order] > -np.inf]), tau


def _qkv(B, H, n, dh, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, dh, generator=g, dtype=dtype) for _ in range(3)]


def _topk_gap(tau, m):
    """Gap between the m-th and (m+1)-th largest score (inf if m >= n): a selection is well defined when it is large."""
    s = np.sort(tau)[::-1]
    return np.inf if m >= s.size else s[m - 1] - s[m]


# ------------------------------------------------------------------ leverage and selection
@settings(max_examples=25)
@given(K=key_matrices(max_n=40, max_d=6))
def test_leverage_scores_equal_streamlev_exact(K):
    got = slt.leverage_scores(torch.from_numpy(K)[None, None]).numpy()[0, 0]
    np.testing.assert_allclose(got, sl.leverage_scores(K), rtol=0, atol=score_tolerance(K))


def test_leverage_batched_equals_per_slice_and_causal_equals_prefixes():
    K = torch.randn(2, 3, 14, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tau = slt.leverage_scores(K)
    tc = slt.leverage_scores(K, causal=True)
    for b in range(2):
        for h in range(3):
            Kn = K[b, h].numpy()
            np.testing.assert_allclose(tau[b, h].numpy(), sl.leverage_scores(Kn), atol=1e-12)
            for i in range(14):
                np.testing.assert_allclose(tc[b, h, i, : i + 1].numpy(), sl.leverage_scores(Kn[: i + 1]), atol=1e-12)
                assert not tc[b, h, i, i + 1 :].any()  # later keys are invisible


@settings(max_examples=25)
@given(K=key_matrices(min_n=2, max_n=40, max_d=6, kinds=("gaussian", "heavy_tailed", "ill_conditioned", "spikes", "huge", "tiny",
                                                                    "column_scaled")),
       frac=st.floats(0.05, 1.0), keep_first=st.booleans())
def test_kept_set_is_streamlevs_exact_leverage_topk(K, frac, keep_first):
    n = K.shape[0]
    budget = max(1, int(frac * n))
    want, tau = _loop_select(K, budget=budget, keep_first=keep_first)
    tt = tau.copy()
    if keep_first:
        tt[0] = np.inf
    assume(_topk_gap(tt, budget) > 10 * score_tolerance(K))  # away from ties the set is unique
    got = slt.select_keys(torch.from_numpy(K)[None], budget=budget, keep_first=keep_first)[0]
    assert np.array_equal(np.flatnonzero(got.numpy()), want)


def test_threshold_mode_is_the_universal_set_capped_by_budget():
    rng = np.random.default_rng(3)
    K = rng.standard_normal((50, 4)) * rng.lognormal(0, 1.5, (50, 1))
    tau = sl.leverage_scores(K)
    for eps in (0.02, 0.1, 0.3):
        got = np.flatnonzero(slt.select_keys(torch.from_numpy(K), eps=eps).numpy())
        assert np.array_equal(got, sl.universal_set(K, eps))
        for cap in (1, 3, 10):
            got = np.flatnonzero(slt.select_keys(torch.from_numpy(K), eps=eps, budget=cap).numpy())
            want, _ = _loop_select(K, budget=cap, eps=eps)
            assert np.array_equal(got, want) and got.size <= cap and (tau[got] >= eps).all()


def test_ties_go_to_the_earlier_key_deterministically():
    from streamlev._torch_attention import _top

    pr = torch.tensor([[0.5, 0.7, 0.5, 0.5, 0.7, 0.5]], dtype=torch.float64)  # bitwise-equal scores
    idx, ok = _top(pr, 3)
    assert idx.tolist() == [[0, 1, 4]] and ok.all()
    idx, ok = _top(torch.tensor([[0.1, -math.inf, 0.1, -math.inf]], dtype=torch.float64), 3)
    assert idx.tolist() == [[0, 1, 2]] and ok.tolist() == [[True, False, True]]  # -inf: padding, not kept


# ------------------------------------------------------------------ attention vs loops
@pytest.mark.parametrize("p", ["softmax", 2.0, 3.0])
@pytest.mark.parametrize("budget,eps,keep_first", [(3, None, False), (5, None, True), (None, 0.15, False),
                                                    (4, 0.05, True)])
def test_equals_plain_loop_per_batch_and_head(p, budget, eps, keep_first):
    q, k, v = _qkv(2, 3, 11, 4, seed=7)
    k = k * torch.linspace(0.2, 3.0, 11, dtype=torch.float64)[:, None]  # spread the leverage scores
    out, A = slt.lev_attention(q, k, v, budget=budget, eps=eps, p=p, keep_first=keep_first, need_weights=True)
    scale = 1 / math.sqrt(4)
    for b in range(2):
        for h in range(3):
            ids, _ = _loop_select(k[b, h].numpy(), budget=budget, eps=eps, keep_first=keep_first)
            want = loop_attention(q[b, h].numpy(), k[b, h].numpy(), v[b, h].numpy(), p, scale, kept_rows=[ids] * 11)
            np.testing.assert_allclose(out[b, h].numpy(), want, rtol=1e-10, atol=1e-12)
            outside = np.setdiff1d(np.arange(11), ids)
            assert not A[b, h][:, outside].any()
            if ids.size:
                np.testing.assert_allclose(A[b, h].sum(-1).numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("p", ["softmax", 2.0, 1.5])
@pytest.mark.parametrize("causal", [False, True])
def test_budget_at_least_n_is_full_attention(p, causal):
    q, k, v = _qkv(2, 2, 9, 5, seed=2)
    got = slt.lev_attention(q, k, v, budget=9, p=p, causal=causal)
    got_eps = slt.lev_attention(q, k, v, eps=1e-12, p=p, causal=causal)  # threshold path
    S = q @ k.transpose(-1, -2)
    if p == "softmax":
        S = S / math.sqrt(5)
        if causal:
            S = S.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
        want = torch.softmax(S, -1) @ v
    else:
        W = S.abs() ** p
        if causal:
            W = W.tril()
        want = (W / W.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_eps, want, rtol=1e-10, atol=1e-12)


def test_module_with_full_budget_equals_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    lev = slt.LevAttention.from_multihead(mha, budget=12)
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    for causal in (False, True):
        mask = torch.ones(12, 12, dtype=torch.bool).triu(1) if causal else None
        want = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
        torch.testing.assert_close(lev(x, is_causal=causal)[0], want, rtol=1e-10, atol=1e-12)
    # the state_dict layout is the same both ways; cross-attention too
    lev2 = slt.LevAttention(16, 4, budget=100).double()
    lev2.load_state_dict(mha.state_dict())
    y = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(lev2(x, y, y)[0], mha(x, y, y)[0], rtol=1e-10, atol=1e-12)


def test_module_equals_projection_then_loop():
    torch.manual_seed(1)
    m = slt.LevAttention(12, 3, budget=4, keep_first=True).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    out, w = m(x, need_weights=True, average_attn_weights=False)
    W, b = m.in_proj_weight.detach(), m.in_proj_bias.detach()
    proj = [(x @ W[i * 12 : (i + 1) * 12].T + b[i * 12 : (i + 1) * 12]).view(2, 10, 3, 4).transpose(1, 2)
            for i in range(3)]
    heads = np.zeros((2, 3, 10, 4))
    kept = m.select(x)
    for bb in range(2):
        for h in range(3):
            q, k, v = (t[bb, h].detach().numpy() for t in proj)
            ids, _ = _loop_select(k, budget=4, keep_first=True)
            assert np.array_equal(np.flatnonzero(kept[bb, h].numpy()), ids)
            heads[bb, h] = loop_attention(q, k, v, "softmax", 0.5, kept_rows=[ids] * 10)
    want = m.out_proj(torch.from_numpy(heads).transpose(1, 2).reshape(2, 10, 12))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    assert w.shape == (2, 3, 10, 10)


# ------------------------------------------------------------------ causal
@pytest.mark.parametrize("p", ["softmax", 2.0])
@pytest.mark.parametrize("budget,eps,keep_first", [(3, None, False), (4, None, True), (None, 0.2, False)])
def test_causal_equals_per_query_prefix_loop(p, budget, eps, keep_first):
    q, k, v = _qkv(2, 2, 12, 3, seed=11)
    k = k * torch.linspace(0.3, 2.0, 12, dtype=torch.float64)[:, None]
    out = slt.lev_attention(q, k, v, budget=budget, eps=eps, p=p, causal=True, keep_first=keep_first)
    kept = slt.select_keys(k, budget=budget, eps=eps, causal=True, keep_first=keep_first)
    for b in range(2):
        for h in range(2):
            kn = k[b, h].numpy()
            keep = []
            for i in range(12):
                row = np.flatnonzero(kept[b, h, i].numpy())
                assert row.size == 0 or row.max() <= i  # never a future key
                ids, tau = _loop_select(kn[: i + 1], budget=budget, eps=eps, keep_first=keep_first)
                tt = np.where(tau >= eps, tau, -np.inf) if eps is not None else tau.copy()
                if keep_first:
                    tt[0] = np.inf
                m = i + 1 if budget is None else budget
                tol = 1e-9
                clear = _topk_gap(tt, m) > tol and (eps is None or np.all(np.abs(tau - eps) > tol))
                if clear:  # away from ties the prefix selection is unique
                    assert np.array_equal(row, ids), (b, h, i)
                keep.append(row)
            want = loop_attention(q[b, h].numpy(), kn, v[b, h].numpy(), p, 1 / math.sqrt(3), kept_rows=keep)
            np.testing.assert_allclose(out[b, h].numpy(), want, rtol=1e-10, atol=1e-12)


def test_causal_output_does_not_depend_on_future_tokens():
    torch.manual_seed(4)
    m = slt.LevAttention(8, 2, budget=3, causal=True).double()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 8, dtype=torch.float64) * 10
    torch.testing.assert_close(m(x)[0][:, :6], m(y)[0][:, :6], rtol=0, atol=0)


# ------------------------------------------------------------------ gradients, determinism, errors
@pytest.mark.parametrize("p,causal", [("softmax", False), (2.0, False), ("softmax", True), (3.0, True)])
def test_gradcheck_over_kept_keys(p, causal):
    q, k, v = _qkv(1, 1 if causal else 2, 6, 3, seed=5)  # causal: one QR per prefix, keep it small
    k = k * torch.linspace(0.5, 2.0, 6, dtype=torch.float64)[:, None]
    for t in (q, k, v):
        t.requires_grad_(True)
    kept0 = slt.select_keys(k, budget=3, causal=causal)

    def f(q, k, v):
        # the selection is piecewise constant: finite differences must not cross a switch
        assert torch.equal(slt.select_keys(k, budget=3, causal=causal), kept0)
        return slt.lev_attention(q, k, v, budget=3, p=p, causal=causal)

    # fast_mode checks random directions of the Jacobian (cheaper; the full check is slow under the causal QRs)
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=causal)


def test_gradcheck_module_input_and_parameter_gradients():
    torch.manual_seed(2)
    m = slt.LevAttention(6, 2, budget=3, keep_first=True).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x)[0], (x,), eps=1e-6, atol=1e-7)
    names, params = zip(*m.named_parameters())

    def g(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(),))[0]

    assert torch.autograd.gradcheck(g, tuple(p.detach().clone().requires_grad_(True) for p in params),
                                    eps=1e-6, atol=1e-7, fast_mode=True)


def test_no_gradient_flows_through_the_selection_and_unkept_keys_get_none():
    q, k, v = _qkv(1, 1, 8, 3, seed=9)
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = slt.lev_attention(q, k, v, budget=3)
    out.sum().backward()
    kept = slt.select_keys(k.detach(), budget=3)[0, 0]
    assert not k.grad[0, 0][~kept].any() and not v.grad[0, 0][~kept].any()
    assert v.grad[0, 0][kept].abs().sum() > 0


def test_deterministic_and_batch_consistent():
    torch.manual_seed(3)
    m = slt.LevAttention(16, 4, budget=5, keep_first=True)
    x = torch.randn(6, 20, 16)
    a, b = m(x)[0], m(x)[0]
    assert torch.equal(a, b)
    assert torch.equal(m.select(x), m.select(x))
    solo = torch.cat([m(x[i : i + 1])[0] for i in range(6)])
    assert torch.equal(m.select(x), torch.cat([m.select(x[i : i + 1]) for i in range(6)]))
    torch.testing.assert_close(solo, a, rtol=1e-5, atol=1e-6)


def test_float32_input_selects_by_float64_leverage():
    torch.manual_seed(5)
    k = torch.randn(1, 1, 30, 4)
    kept = slt.select_keys(k, budget=6)[0, 0].numpy()
    want, _ = _loop_select(k[0, 0].double().numpy(), budget=6)
    assert np.array_equal(np.flatnonzero(kept), want)


def test_errors_say_what_was_received():
    with pytest.raises(ValueError, match="budget=.*eps="):
        slt.LevAttention(8, 2)
    with pytest.raises(ValueError, match="must divide"):
        slt.LevAttention(8, 3, budget=2)
    with pytest.raises(TypeError, match="budget must be an int"):
        slt.LevAttention(8, 2, budget=2.5)
    with pytest.raises(ValueError, match="eps must be"):
        slt.LevAttention(8, 2, eps=1.5)
    with pytest.raises(ValueError, match="p must be"):
        slt.LevAttention(8, 2, budget=2, p=0.5)
    with pytest.raises(ValueError, match="scale applies to softmax only"):
        slt.LevAttention(8, 2, budget=2, p=2.0, scale=1.0)
    m = slt.LevAttention(8, 2, budget=2)
    with pytest.raises(ValueError, match=r"embed_dim=8.*\(2, 5, 7\)"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(NotImplementedError, match="key_padding_mask"):
        m(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_q == n"):
        m(torch.randn(2, 5, 8), torch.randn(2, 6, 8), is_causal=True)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        slt.LevAttention.from_multihead(m)
