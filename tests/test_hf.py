"""streamlev.hf: compressed KV caches inside transformers decoders (tiny random models, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest

import streamlev as sl
from streamlev.selectors import expected_logit_scores, keydiff_scores, rope_rotations

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
slh = pytest.importorskip("streamlev.hf")

VOCAB = 97


def _llama(layers=2):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gemma(window=8):
    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                        sliding_window=window, max_position_embeddings=512,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def gemma():
    return _gemma()


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


def _gen(model, ids, steps=8):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def _decode(model, cache, ids, steps):
    """Prefill ids, then feed tokens one at a time; yields (cache, next_position) after each call."""
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        yield out.logits[0, -1]
        for t in range(steps):
            out = model(_ids(1, 100 + t), past_key_values=cache, use_cache=True)
            yield out.logits[0, -1]


# ------------------------------------------------------------------ full budget == no compression
@pytest.mark.parametrize("which", ["llama", "gemma"])
@pytest.mark.parametrize("selector,mode", [("default", "evict"), ("keydiff", "evict"), ("default", "append_only"),
                                           ("default", "prefill")])
def test_budget_covering_the_context_gives_bit_identical_outputs(which, selector, mode, llama, gemma):
    model = llama if which == "llama" else gemma
    ids = _ids(30)
    with torch.no_grad():
        ref = _gen(model, ids)
        with slh.compress(model, budget=38, selector=selector, mode=mode) as h:
            out = _gen(model, ids)
    assert isinstance(h.cache, slh.StreamlevCache)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))


# ------------------------------------------------------------------ budgets, sinks, windows
@pytest.mark.parametrize("selector", ["default", "expected_attention", "keydiff", "knorm", "streaming"])
def test_cache_stays_within_budget_and_keeps_sinks(selector, llama):
    budget = 16
    cache = slh.make_cache(llama, budget, selector).attach(llama)
    try:
        for step, _ in enumerate(_decode(llama, cache, _ids(40), 30)):
            seen = cache.get_seq_length()
            for layer in cache.layers:
                pos = layer.kept_positions()
                assert pos.shape[-1] <= budget and layer.keys.shape[2] == pos.shape[-1]
                assert int(pos.max()) < seen
                assert all(len(set(row.tolist())) == row.numel() for row in pos.reshape(-1, pos.shape[-1]))
                assert torch.equal(pos[..., :4], torch.arange(4).expand_as(pos[..., :4]))  # sinks
    finally:
        cache.detach()
    assert step == 30


def test_default_keeps_four_sinks_and_the_newest_half_of_the_budget_at_every_step(llama):
    budget = 16  # 4 sinks and the 8 newest positions kept unconditionally, 4 slots chosen by the score
    cache = slh.make_cache(llama, budget, "default").attach(llama)
    try:
        for _ in _decode(llama, cache, _ids(40), 30):
            seen = cache.get_seq_length()
            for layer in cache.layers:
                held = set(layer.kept_positions()[0, 0].tolist())
                assert set(range(4)) | set(range(seen - 8, seen)) <= held
    finally:
        cache.detach()


@pytest.mark.parametrize("which,budget", [("llama", 12), ("gemma", 12), ("gemma", 5)])  # 5: windows compressed
def test_prefill_mode_compresses_the_prompt_then_appends_every_decoded_token(which, budget, llama, gemma):
    model, steps = (llama if which == "llama" else gemma), 10
    ids = _ids(40)
    ref = slh.make_cache(model, budget, "default").attach(model)  # evict mode: the same prompt selection
    with torch.no_grad():
        model(ids, past_key_values=ref, use_cache=True)
    ref.detach()
    cache = slh.make_cache(model, budget, "default", mode="prefill").attach(model)
    try:
        for t, _ in enumerate(_decode(model, cache, ids, steps)):
            for layer, first in zip(cache.layers, ref.layers):
                pos = layer.kept_positions()[0, 0].tolist()
                if layer.is_sliding:  # a window still evicts (the window bounds it)
                    assert len(pos) <= min(budget, 7) and min(pos) >= 40 + t - 7
                    assert layer.passthrough == (budget >= 7)
                    continue
                assert pos == first.kept_positions()[0, 0].tolist() + list(range(40, 40 + t))
    finally:
        cache.detach()
    assert t == steps


def test_prefill_mode_is_for_softmax_selectors_only(llama):
    with pytest.raises(ValueError, match="prefill"):
        slh.make_cache(llama, 16, "leverage", mode="prefill")


@pytest.mark.parametrize("budget", [3, 5, 20])
@pytest.mark.parametrize("mode", ["evict", "append_only"])
def test_sliding_window_layers_never_hold_keys_outside_the_window(budget, mode, gemma):
    cache = slh.make_cache(gemma, budget, "default", mode=mode).attach(gemma)
    W = 8
    try:
        for _ in _decode(gemma, cache, _ids(25), 20):
            nxt = cache.get_seq_length()  # position of the next query
            for layer in cache.layers:
                pos = layer.kept_positions()
                if layer.is_sliding:
                    assert pos.numel() == 0 or int(pos.min()) >= nxt - W + 1
                    assert pos.shape[-1] <= min(budget, W - 1)
                else:
                    assert pos.shape[-1] <= budget
    finally:
        cache.detach()


def test_new_tokens_get_their_true_positions(llama):
    """The next token's logits equal a DynamicCache holding the same kept keys, fed with explicit positions."""
    cache = slh.make_cache(llama, 12, "keydiff").attach(llama)
    with torch.no_grad():
        llama(_ids(40), past_key_values=cache, use_cache=True)
        for t in range(6):
            tok = _ids(1, 200 + t)
            ref = transformers.DynamicCache()
            for i, layer in enumerate(cache.layers):
                ref.update(layer.keys.clone(), layer.values.clone(), i)
            pos = torch.tensor([cache.get_seq_length()])
            want = llama(tok, past_key_values=ref, position_ids=pos[None], cache_position=pos).logits
            got = llama(tok, past_key_values=cache, use_cache=True).logits
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    cache.detach()


# ------------------------------------------------------------------ append-only
@pytest.mark.parametrize("which,selector", [("llama", "default"), ("llama", "keydiff"), ("llama", "leverage"),
                                            ("gemma", "default")])
def test_append_only_never_rewrites_an_entry(which, selector, llama, gemma):
    model = llama if which == "llama" else gemma
    budget = 24
    cache = slh.make_cache(model, budget, selector, mode="append_only").attach(model)
    prev = None
    try:
        for _ in _decode(model, cache, _ids(40), 25):
            now = [(l.keys.clone(), l.values.clone(), l.pos.clone()) for l in cache.layers]
            for layer, (k, v, p) in zip(cache.layers, now):
                assert k.shape[2] <= budget
            if prev is not None:
                for layer, (k0, v0, p0), (k1, v1, p1) in zip(cache.layers, prev, now):
                    if layer.is_sliding:  # entries that left the window are freed, the others stay as they were
                        live = torch.isin(p0[0, 0], p1[0, 0])
                        k0, v0, p0 = k0[:, :, live], v0[:, :, live], p0[:, :, live]
                        n = p0.shape[-1]
                        assert torch.equal(p1[..., :n], p0)
                    n = p0.shape[-1]
                    assert torch.equal(k1[:, :, :n], k0) and torch.equal(v1[:, :, :n], v0)
                    assert torch.equal(p1[..., :n], p0)
            prev = now
    finally:
        cache.detach()


def test_append_only_needs_batch_size_one(llama):
    cache = slh.make_cache(llama, 8, "default", mode="append_only").attach(llama)
    with pytest.raises(ValueError, match="batch size 1"):
        llama(torch.cat([_ids(12), _ids(12, 1)]), past_key_values=cache)
    cache.detach()


# ------------------------------------------------------------------ guarantee mode
def _recording(cache):
    """Record the keys each layer of ``cache`` receives (what the cache saw, compressed upstream layers included)."""
    seen = [[] for _ in cache.layers]
    for i, layer in enumerate(cache.layers):
        def update(k, v, kw=None, orig=layer.update, i=i):
            seen[i].append(k[0].double().clone())
            return orig(k, v, kw)
        layer.update = update
    return lambda: [torch.cat(s, dim=1).numpy() for s in seen]


def test_guarantee_mode_keeps_exactly_the_offline_universal_set(llama):
    budget, steps = 64, 12
    ids = _ids(50)
    cache = slh.make_cache(llama, budget, "leverage")
    keys = _recording(cache)
    list(_decode(llama, cache, ids, steps))
    full = keys()
    eps = 16 / budget
    for layer, K in zip(cache.layers, full):
        kept = layer.kept_positions()[0]
        tau = layer.lev.leverage(layer.keys.reshape(-1, layer.keys.shape[2], 16)).reshape(kept.shape[0], -1)
        order = layer.pos[0].argsort(dim=-1)
        tau = tau.gather(1, order)
        for g in range(K.shape[0]):
            U = sl.universal_set(K[g], eps)
            assert set(U.tolist()) <= set(kept[g].tolist())  # no false negatives
            assert set(kept[g][tau[g] >= eps].tolist()) == set(U.tolist())  # exactly U among the kept
            ref = sl.leverage_scores(K[g])[kept[g].numpy()]
            np.testing.assert_allclose(tau[g].numpy(), ref, rtol=1e-7, atol=1e-10)
        assert kept.shape[-1] <= budget


def test_guarantee_append_only_admits_exactly_the_keys_above_eps_for_their_prefix(llama):
    budget, steps = 60, 10
    ids = _ids(30)
    cache = slh.make_cache(llama, budget, "leverage", mode="append_only")
    keys = _recording(cache)
    list(_decode(llama, cache, ids, steps))
    full = keys()
    eps = 16 / budget
    for layer, K in zip(cache.layers, full):
        prefix = np.array([[sl.leverage_scores(K[g][: j + 1])[-1] for j in range(K.shape[1])]
                           for g in range(K.shape[0])])
        want = np.flatnonzero((prefix >= eps).any(axis=0))
        got = layer.kept_positions()[0, 0].numpy()
        assert layer.overflow == 0 and np.array_equal(got, want)
        U = set().union(*(sl.universal_set(K[g], eps).tolist() for g in range(K.shape[0])))
        assert U <= set(got.tolist())  # the final universal set is inside the append-only cache


@pytest.mark.parametrize("kind", ["random", "ill_conditioned", "duplicates", "zero_rows", "tiny_scale"])
def test_exact_leverage_set_matches_the_float64_reference(kind):
    rng = np.random.default_rng(3)
    K = rng.standard_normal((3, 50, 6))
    if kind == "ill_conditioned":
        K = K * np.logspace(0, -4, 6)
    elif kind == "duplicates":
        K[:, 25:] = K[:, :25]
    elif kind == "zero_rows":
        K[:, ::7] = 0.0
    elif kind == "tiny_scale":
        K = K * 1e-150
    lev = slh.ExactLeverageSet(3, 6, 0.1)
    pre = lev.prefix_leverage(torch.from_numpy(K[:, :20]), chunk=7).numpy()
    lev.observe(torch.from_numpy(K[:, 20:]))
    tau = lev.leverage(torch.from_numpy(K)).numpy()
    for s in range(3):
        np.testing.assert_allclose(tau[s], sl.leverage_scores(K[s]), rtol=1e-6, atol=1e-9)
        want = [sl.leverage_scores(K[s][: j + 1])[-1] for j in range(20)]
        np.testing.assert_allclose(pre[s], want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ torch selectors vs the numpy reference
def test_keydiff_matches_the_numpy_rule():
    K = np.random.default_rng(0).standard_normal((1, 1, 40, 8))
    sel = slh.selectors.KeyDiff()
    st = sel.new_state(None)
    kt = torch.from_numpy(K)
    sel.observe_keys(st, kt)
    got = sel.score(st, kt, None, 40, normalize=True)[0, 0].double().numpy()
    np.testing.assert_allclose(got, keydiff_scores(K[0, 0]), rtol=1e-5, atol=1e-6)


def test_expected_attention_matches_expected_logit_scores_with_rope_rotations(llama):
    from streamlev.hf._model import inspect_model
    from streamlev.query_sketch import QuerySketch

    info = inspect_model(llama)[0]
    import dataclasses

    info = dataclasses.replace(info, num_heads=1, num_kv_heads=1)
    rng = np.random.default_rng(1)
    K = rng.standard_normal((30, 16))
    Q = rng.standard_normal((50, 16)) + 0.5
    sel = slh.selectors.ExpectedAttention(cov_rank=None)
    st = sel.new_state(info)
    sel.observe_queries(st, [torch.from_numpy(Q)[None, None]], 50)
    got = sel.score(st, torch.from_numpy(K)[None, None], None, 30, normalize=True)[0, 0].double().numpy()
    theta = 1.0 / float(info.inv_freq[1]) ** (16 / 2)  # inv_freq[i] = theta ** (-2i/d)
    R = rope_rotations(16, 30 + 32 * np.arange(16), theta)
    ref = expected_logit_scores(K, QuerySketch(16).update(Q), scale=info.scaling, rotations=R)
    ref = ref - np.log(np.exp(ref - ref.max()).sum()) - ref.max()  # softmax-normalised, as the GQA pooling does
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ bad input, caught before any weight is used
class _Counter:
    def __init__(self, model):
        self.calls = 0
        self.h = model.get_input_embeddings().register_forward_hook(self)

    def __call__(self, *a):
        self.calls += 1


def test_unsupported_architecture_is_rejected_before_any_forward():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match="model type 'gpt2'.*not supported"):
        with slh.compress(model, budget=8):
            pass
    with pytest.raises(ValueError, match="not supported"):
        slh.make_cache(model, 8)


@pytest.mark.parametrize("budget,exc,match", [(0, ValueError, ">= 1"), (-3, ValueError, ">= 1"),
                                              (1.5, ValueError, r"\(0, 1\]"), (0.0, ValueError, r"\(0, 1\]"),
                                              (True, TypeError, "budget must be"), ("8", TypeError, "budget must be")])
def test_bad_budgets_raise_clear_errors(budget, exc, match, llama):
    with pytest.raises(exc, match=match):
        with slh.compress(llama, budget=budget):
            pass


def test_budget_larger_than_the_context_fails_before_the_model_runs(llama):
    counter = _Counter(llama)
    try:
        with slh.compress(llama, budget=100):
            with pytest.raises(ValueError, match="larger than the context"):
                llama.generate(_ids(20), max_new_tokens=5, do_sample=False)
            with pytest.raises(ValueError, match="larger than the context"):
                llama(_ids(20))
        assert counter.calls == 0
    finally:
        counter.h.remove()


def test_wrong_cache_kind_and_padding_fail_before_the_model_runs(llama):
    counter = _Counter(llama)
    try:
        with slh.compress(llama, budget=8):
            with pytest.raises(TypeError, match="must be a StreamlevCache"):
                llama(_ids(20), past_key_values=transformers.DynamicCache())
            mask = torch.ones(1, 20, dtype=torch.long)
            mask[0, :3] = 0
            with pytest.raises(ValueError, match="padded"):
                llama.generate(_ids(20), attention_mask=mask, max_new_tokens=2)
        assert counter.calls == 0
    finally:
        counter.h.remove()


@pytest.mark.parametrize("kwargs,match", [(dict(selector="nope"), "unknown selector"),
                                          (dict(mode="lru"), "mode must be"),
                                          (dict(selector="keydiff", eps=0.1), "eps applies"),
                                          (dict(selector="leverage", budget=8), "budget >= head_dim"),
                                          (dict(selector="leverage", eps=0.01), "eps >= head_dim")])
def test_bad_options_raise_clear_errors(kwargs, match, llama):
    kwargs = dict(dict(budget=32), **kwargs)
    with pytest.raises(ValueError, match=match):
        slh.make_cache(llama, **kwargs)


def test_guarantee_mode_rejects_sliding_window_models(gemma):
    with pytest.raises(ValueError, match="sliding window"):
        slh.make_cache(gemma, 32, "leverage")


def test_compress_restores_the_model_and_memory_is_below_the_full_cache(llama):
    gen, fwd = llama.generate, llama.forward
    with torch.no_grad(), slh.compress(llama, budget=0.25) as h:
        llama(_ids(64))
    assert llama.generate == gen and llama.forward == fwd
    assert all(layer.budget == 16 for layer in h.cache.layers)
    full = 2 * 2 * 64 * 16 * 4 * len(h.cache.layers)  # K and V, 2 kv heads, 64 tokens, d=16, float32
    assert 0 < h.cache.nbytes < full


def test_query_statistics_shrink_to_mean_and_factor_after_the_prompt(gemma):
    """Gemma-size heads: the d x d second moments are dropped once the prompt is compressed."""
    cache = slh.make_cache(gemma, 6, "expected_attention").attach(gemma)
    try:
        list(_decode(gemma, cache, _ids(40), 3))
        for layer in cache.layers:
            if not layer.passthrough:
                st = layer.state
                assert st["frozen"] and st["sq"] is None and st["cov"].shape[-1] == 8
    finally:
        cache.detach()


def test_sliding_window_option_keeps_windows_and_compresses_full_layers(gemma):
    cache = slh.make_cache(gemma, 4, "default", sliding="window").attach(gemma)
    try:
        for _ in _decode(gemma, cache, _ids(30), 5):
            nxt = cache.get_seq_length()
            for layer in cache.layers:
                pos = layer.kept_positions()[0, 0]
                if layer.is_sliding:  # exactly transformers' window: the last window - 1 positions
                    assert torch.equal(pos, torch.arange(nxt - 7, nxt))
                else:
                    assert pos.numel() <= 4
    finally:
        cache.detach()
    with pytest.raises(ValueError, match="sliding must be"):
        slh.make_cache(gemma, 4, sliding="drop")


@pytest.mark.parametrize("stride", [1, 3])
def test_observed_attention_matches_a_direct_computation(llama, stride):
    """The #16 query default: decayed mean over buffered queries (moved to position n) of their softmax over keys.

    ``stride=3`` buffers only the queries at positions divisible by 3.
    """
    from streamlev.hf._model import inspect_model

    info = inspect_model(llama)[0]  # 4 query heads over 2 key/value heads, d = 16
    rng = np.random.default_rng(2)
    Q = rng.standard_normal((1, 4, 20, 16))  # pre-RoPE queries at positions 30..49
    K = rng.standard_normal((1, 2, 12, 16))
    sel = slh.selectors.ObservedAttention(buffer=15 if stride == 1 else 5, half_life=4.0, stride=stride)
    st = sel.new_state(info)
    sel.observe_queries(st, [torch.from_numpy(Q[:, :, :8]), torch.from_numpy(Q[:, :, 8:])], 50)
    got = sel.score(st, torch.from_numpy(K), None, 50, normalize=True)[0].double().numpy()
    theta = 1.0 / float(info.inv_freq[1]) ** (16 / 2)
    R = rope_rotations(16, [50], theta)[0]
    pos = np.arange(35, 50) if stride == 1 else np.array([36, 39, 42, 45, 48])  # the newest 15 / 5 on the grid
    w = 2.0 ** (-(pos.max() - pos) / 4.0)
    want = np.zeros((2, 12))
    for g in range(2):
        for h in (2 * g, 2 * g + 1):
            for i, p in enumerate(pos):
                lg = info.scaling * K[0, g] @ (R @ Q[0, h, p - 30])
                e = np.exp(lg - lg.max())
                want[g] += w[i] * e / e.sum()
        want[g] /= 2 * w.sum()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_observed_attention_newest_weight_mixes_in_the_newest_query_off_the_grid(llama):
    from streamlev.hf._model import inspect_model

    info = inspect_model(llama)[0]  # 4 query heads over 2 key/value heads, d = 16
    rng = np.random.default_rng(5)
    Q = rng.standard_normal((1, 4, 20, 16))  # pre-RoPE queries at positions 30..49; 49 is off the stride-3 grid
    K = rng.standard_normal((1, 2, 12, 16))
    sel = slh.selectors.ObservedAttention(buffer=5, half_life=4.0, stride=3, newest_weight=0.3)
    st = sel.new_state(info)
    sel.observe_queries(st, [torch.from_numpy(Q[:, :, :8]), torch.from_numpy(Q[:, :, 8:])], 50)
    got = sel.score(st, torch.from_numpy(K), None, 50, normalize=True)[0].double().numpy()
    theta = 1.0 / float(info.inv_freq[1]) ** (16 / 2)
    R = rope_rotations(16, [50], theta)[0]

    def share(g, p):  # softmax over the keys of query p (moved to position 50), pooled over the group
        out = 0.0
        for h in (2 * g, 2 * g + 1):
            lg = info.scaling * K[0, g] @ (R @ Q[0, h, p - 30])
            e = np.exp(lg - lg.max())
            out = out + e / e.sum() / 2
        return out

    pos = np.array([36, 39, 42, 45, 48])
    w = 2.0 ** (-(pos.max() - pos) / 4.0)
    w /= w.sum()
    newest = (share(0, 49) + share(1, 49)) / 2  # pooled over all 4 query heads: both key/value heads share it
    want = np.stack([0.7 * sum(w[i] * share(g, p) for i, p in enumerate(pos)) + 0.3 * newest for g in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="newest_weight must be in"):
            slh.selectors.ObservedAttention(newest_weight=bad)


@pytest.mark.parametrize("pool", [3, 5])
def test_observed_attention_pool_takes_the_best_score_of_each_keys_neighbours(llama, pool):
    from streamlev.hf._model import inspect_model

    info = inspect_model(llama)[0]
    rng = np.random.default_rng(3)
    Q = torch.from_numpy(rng.standard_normal((1, 4, 10, 16)))
    K = torch.from_numpy(rng.standard_normal((1, 2, 12, 16)))
    plain, pooled = (slh.selectors.ObservedAttention(buffer=10, pool=k) for k in (1, pool))
    st1, st2 = plain.new_state(info), pooled.new_state(info)
    plain.observe_queries(st1, [Q], 40)
    pooled.observe_queries(st2, [Q], 40)
    a = plain.score(st1, K, None, 40, normalize=True)[0].numpy()
    got = pooled.score(st2, K, None, 40, normalize=True)[0].numpy()
    h = pool // 2
    want = np.stack([[a[g, max(0, j - h): j + h + 1].max() for j in range(12)] for g in range(2)])
    np.testing.assert_array_equal(got, want)


def test_observed_attention_positional_prior_matches_a_direct_computation(llama):
    from streamlev.hf._model import inspect_model

    info = inspect_model(llama)[0]  # 4 query heads over 2 key/value heads, d = 16
    rng = np.random.default_rng(4)
    n, W = 12, 10  # a span longer than the distance to the sinks, so that leaving them out is exercised
    Q = rng.standard_normal((1, 4, n, 16))  # pre-RoPE queries at positions 0..11
    K = rng.standard_normal((1, 2, n, 16))  # post-RoPE keys at positions 0..11
    sel = slh.selectors.ObservedAttention(buffer=W, stride=1, half_life=3.0, sinks=2, positional=True)
    plain = slh.selectors.ObservedAttention(buffer=W, stride=1, half_life=3.0, sinks=2)
    st, st0 = sel.new_state(info), plain.new_state(info)
    sel.observe_queries(st, [torch.from_numpy(Q)], n)
    plain.observe_queries(st0, [torch.from_numpy(Q)], n)
    pos = torch.arange(n).expand(1, 2, n)
    got = sel.score(st, torch.from_numpy(K), pos, n, normalize=True)[0].double().numpy()
    content = plain.score(st0, torch.from_numpy(K), pos, n, normalize=True)[0].double().numpy()
    theta = 1.0 / float(info.inv_freq[1]) ** (16 / 2)
    qpos = np.arange(n - W, n)
    w = 2.0 ** (-(qpos.max() - qpos) / 3.0)
    w /= w.sum()
    prof = np.zeros((2, W))  # span = buffer * stride = 10 distances
    for g in range(2):
        for h in (2 * g, 2 * g + 1):
            for i, p in enumerate(qpos):
                R = rope_rotations(16, [int(p)], theta)[0]
                lg = info.scaling * K[0, g, : p + 1] @ (R @ Q[0, h, p])
                a = np.exp(lg - lg.max())
                a /= a.sum()
                for j in range(2, p + 1):  # sinks (positions 0, 1) left out
                    if p - j < W:
                        prof[g, p - j] += w[i] * a[j] / 2
    dist = n - np.arange(n)
    want = 0.5 * content + 0.5 * np.where(dist < W, prof[:, np.minimum(dist, W - 1)], 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_observed_attention_prompt_buffer_scores_the_prompt_densely_then_drops_it(llama):
    OA = slh.selectors.ObservedAttention
    kw = dict(half_life=8.0, sinks=2, recent_fraction=0.25)
    rules = {"dense": OA(buffer=4, stride=8, prompt_buffer=16, **kw), "ref": OA(buffer=16, stride=1, **kw),
             "strided": OA(buffer=4, stride=8, **kw)}
    kept, states = {}, {}
    for name, sel in rules.items():
        cache = slh.make_cache(llama, 12, sel).attach(llama)
        try:
            steps = _decode(llama, cache, _ids(40, seed=3), 0)
            next(steps)  # the 40-token prompt, compressed to 12 keys
            kept[name] = [cache.kept_positions(i).clone() for i in range(len(cache.layers))]
            states[name] = [layer.state for layer in cache.layers]
            if name == "dense":
                list(_decode(llama, cache, _ids(1, seed=4), 0))  # a decoded token leaves no dense queries behind
                assert all(st["dense"] is None for st in states[name])
        finally:
            cache.detach()
    # the prompt is scored by its newest 16 queries at every position, as a dense buffer of 16 would score it
    assert all(torch.equal(a, b) for a, b in zip(kept["dense"], kept["ref"]))
    assert any(not torch.equal(a, b) for a, b in zip(kept["dense"], kept["strided"]))  # the test can tell them apart
    # afterwards the strided buffer alone remains: every 8th position, the newest 4 (the decoded token is at 40)
    for st in states["dense"]:
        assert st["dense"] is None and st["p"].tolist() == [16, 24, 32, 40]
    with pytest.raises(ValueError, match="prompt_buffer must be an int >= 0"):
        OA(prompt_buffer=-1)


@pytest.mark.parametrize("pool", [0, 2, -1])
def test_observed_attention_pool_must_be_odd_and_positive(pool):
    with pytest.raises(ValueError, match="pool must be an odd int >= 1"):
        slh.selectors.ObservedAttention(pool=pool)


@pytest.mark.parametrize("bad", [dict(buffer=0), dict(half_life=0.0), dict(stride=0)])
def test_observed_attention_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="need buffer >= 1, half_life > 0 and stride >= 1"):
        slh.selectors.ObservedAttention(**bad)


@pytest.mark.parametrize("selector", ["default", "observed", "keys"])
def test_issue16_defaults_run_within_budget(selector, llama, gemma):
    for model in (llama, gemma):
        cache = slh.make_cache(model, 10, selector).attach(model)
        try:
            for _ in _decode(model, cache, _ids(30), 12):
                assert all(layer.n <= 10 for layer in cache.layers)
        finally:
            cache.detach()
        sinks = [layer.kept_positions()[0, 0, :2].tolist() for layer in cache.layers if not layer.is_sliding]
        if selector == "keys":
            assert all(s == [0, 1] for s in sinks)  # min(4, 10 // 4) sinks


def _other(kind):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)
    torch.manual_seed(0)
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8, **common)).eval()
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common)).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_other_supported_decoders_are_exact_at_full_budget_and_bounded_below_it(kind):
    model = _other(kind)
    ids = _ids(30)
    with torch.no_grad():
        ref = _gen(model, ids)
        with slh.compress(model, budget=38):
            out = _gen(model, ids)
        assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))
        with slh.compress(model, budget=6) as h:
            _gen(model, ids)
    window = getattr(model.config, "sliding_window", None) if kind == "mistral" else None
    for layer in h.cache.layers:
        pos = layer.kept_positions()
        assert pos.shape[-1] <= 6
        if window:
            assert layer.is_sliding and int(pos.min()) >= h.cache.get_seq_length() - window + 1


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen3"])
def test_query_hooks_buffer_pre_rope_queries_as_batch_heads_tokens_dim(kind, llama, gemma):
    model = {"llama": llama, "gemma": gemma}.get(kind) or _other(kind)
    cache = slh.make_cache(model, 64, "observed").attach(model)
    captured = {}
    li = next(i for i, layer in enumerate(cache.layers) if not layer.is_sliding)  # sliding layers keep no queries
    attn = model.model.layers[li].self_attn
    norm = getattr(attn, "q_norm", None)
    h = (norm or attn.q_proj).register_forward_hook(lambda m, a, o: captured.setdefault("q", o.detach().clone()))
    try:
        with torch.no_grad():
            model(_ids(30), past_key_values=cache, use_cache=True)  # fits the budget: the queries stay buffered
        q = cache.query_buffers[li][0]
        assert q.shape == (1, 4, 30, 16)
        raw = captured["q"]
        want = {"llama": lambda: raw.view(1, 30, 4, 16).transpose(1, 2), "gemma": lambda: raw,
                "qwen3": lambda: raw.transpose(1, 2)}[kind]()
        assert torch.equal(q, want)
    finally:
        h.remove()
        cache.detach()


@pytest.mark.parametrize("selector", ["expected_attention", "observed"])
def test_value_norm_weighs_scores_by_the_value_norm(selector, llama):
    cls = slh.selectors.SELECTORS[selector]
    plain, weighed = cls(), cls(value_norm=True)
    score = torch.tensor([[[0.5, -1.0, 2.0]]], dtype=torch.float64)
    v = torch.tensor([[[[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    assert torch.equal(plain.weigh(score, v), score)
    want = score + torch.log(torch.tensor([5.0, 1.0, 1e-30])) if weighed.log_domain else score * torch.tensor([5.0, 1.0, 0.0])
    torch.testing.assert_close(weighed.weigh(score, v), want.to(score.dtype))
    # inside a forward pass: a token whose value is zero in every layer adds nothing to any output; it is never kept
    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda mod, inp, out: out.index_fill(1, torch.tensor([10]), 0.0) if out.shape[1] > 10 else out)
        for layer in llama.model.layers]
    try:
        seen = {}
        for sel in (weighed, plain):
            cache = slh.make_cache(llama, 12, sel).attach(llama)
            try:
                list(_decode(llama, cache, _ids(40, seed=5), 4))
            finally:
                cache.detach()
            seen[sel.value_norm] = [bool((layer.kept_positions() == 10).any()) for layer in cache.layers]
        assert not any(seen[True]) and any(seen[False])  # without the weighing the rule keeps it somewhere
    finally:
        for h in hooks:
            h.remove()
