"""TorchDecodeEngine (on CPU here) agrees with the numpy DecodeEngine; per-token sets never miss a key."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamlev.decode_engine import DecodeEngine  # noqa: E402
from streamlev.torch_engine import TorchDecodeEngine  # noqa: E402


def _keys(S, n, d, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((S, n, d)) * rng.lognormal(0.0, 1.0, (S, n, 1))).astype(np.float32)


def _side_by_side(a, b, Kt, prefill):
    """Feed the numpy engine a and the torch engine b the same keys, token by token after a prefill block;
    b's kept set must contain a's after every token; a final empty update refreshes b exactly."""
    n = Kt.shape[1]
    a.update(Kt[:, :prefill])
    b.update(Kt[:, :prefill])
    for i in range(prefill, n):
        a.update(Kt[:, i])
        b.update(Kt[:, i], check_finite=False)
        assert (b.keep_mask(n).numpy() >= a.keep_mask(n)).all()  # no false negatives between refreshes
    b.update(Kt[:, :0])


@pytest.mark.parametrize("dtype,cond", [("float16", 1), ("bfloat16", 1), ("float32", 1), ("float32", 1e3)])
def test_torch_engine_equals_numpy_engine(dtype, cond):
    S, d, eps, n = 3, 8, 0.15, 300
    K = _keys(S, n, d, 1) * np.logspace(0, np.log10(cond), d).astype(np.float32)  # kappa ~ cond
    Kt = torch.from_numpy(K).to(getattr(torch, dtype))  # the numpy engine gets the same rounded keys
    a = DecodeEngine(S, d, eps, dtype=dtype)
    b = TorchDecodeEngine(S, d, eps, dtype=dtype, refresh_every=40)
    _side_by_side(a, b, Kt, 5)
    for s in range(S):
        ia, ta = a.scores(head=s)
        ib, tb = b.scores(head=s)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(tb, ta, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(b.keep_mask(n).numpy(), a.keep_mask(n))
    for got, want in zip(b.universal_set(0.3), a.universal_set(0.3), strict=True):  # all heads at once
        np.testing.assert_array_equal(got, want)


def test_torch_changes_and_payloads():
    S, d, eps, n = 2, 6, 0.2, 200
    K = torch.from_numpy(_keys(S, n, d, 2))
    V = torch.randn(S, n, 3, generator=torch.Generator().manual_seed(0))
    b = TorchDecodeEngine(S, d, eps, dtype=torch.float32, value_dim=3, refresh_every=16)
    b.update(K[:, :10], values=V[:, :10])
    for i in range(10, n):
        before = b.keep_mask(n)
        ch = b.update(K[:, i], values=V[:, i], return_changes=True)
        after = b.keep_mask(n)
        assert torch.equal(ch.added[:, 0], after[:, i])
        for s in range(S):
            gone = set(ch.evicted[s][ch.evicted[s] >= 0].tolist())
            assert gone == set(torch.nonzero(before[s] & ~after[s]).flatten().tolist())
    for s in range(S):
        v = b._valid[s]
        ids = b._ids[s][v]
        assert torch.equal(b._V[s][v], V[s, ids])
        assert torch.equal(b._K[s][v], K[s, ids])


def test_torch_bad_input_changes_nothing():
    S, d = 2, 4
    b = TorchDecodeEngine(S, d, 0.3, dtype=torch.float16)
    b.update(torch.from_numpy(_keys(S, 20, d, 3)))
    state = [t.clone() for t in (b._R, b._K, b._ids, b._valid, b._tau)]
    n = b.n
    bad = torch.ones(S, 1, d)
    bad[1, 0, 2] = float("nan")
    for kw, exc in ((dict(keys=bad), ValueError), (dict(keys=torch.full((S, 1, d), 1e6)), ValueError),
                    (dict(keys=torch.ones(S + 1, 1, d)), ValueError), (dict(keys=np.ones((S, 1, d))), TypeError),
                    (dict(keys=torch.ones(S, 1, d), ids=[3]), ValueError),
                    (dict(keys=torch.ones(S, 2, d), ids=[30, 30]), ValueError)):
        with pytest.raises(exc, match="TorchDecodeEngine.update"):
            b.update(**kw)
        assert all(torch.equal(x, y) for x, y in zip(state, (b._R, b._K, b._ids, b._valid, b._tau)))
        np.testing.assert_array_equal(b.n, n)


def test_torch_engine_with_untouched_coordinates_never_misses_a_key(monkeypatch):
    # real Gemma 3 keys have coordinates that are exactly zero in every key; one sketch later gets a key there
    S, d, eps, n = 3, 10, 0.15, 260
    K = _keys(S, n, d, 3)
    K[:, :, [1, 6]] = 0.0
    K[2, 150, 6] = 2.0
    Kt = torch.from_numpy(K)
    a = DecodeEngine(S, d, eps, dtype="float32")
    b = TorchDecodeEngine(S, d, eps, dtype="float32", refresh_every=40)
    exact = []
    orig = TorchDecodeEngine._exact_step
    monkeypatch.setattr(TorchDecodeEngine, "_exact_step", lambda self, *x: exact.append(1) or orig(self, *x))
    _side_by_side(a, b, Kt, 12)
    np.testing.assert_array_equal(b.keep_mask(n).numpy(), a.keep_mask(n))
    assert len(exact) <= 2  # the prefill, not every token (the rank-one step runs with the untouched coordinates)
