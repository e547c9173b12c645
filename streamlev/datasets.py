"""Real attention queries, keys and values shipped with streamlev.

The embedded sample ``streamlev/data/minilm_qkv.npz`` holds the per-layer,
per-head queries, keys and values of ``sentence-transformers/all-MiniLM-L6-v2``
(6 layers, 12 heads, head dimension 32) on one 256-token English passage from
the CPython standard library; ``streamlev/data/PROVENANCE.md`` says how it was
made. ``examples/extract_keys.py`` writes files of the same layout (more
documents, up to 512 tokens each), which :func:`load_qkv` reads.

Files are read with ``np.load(..., allow_pickle=False)``: an archive holding
object arrays is refused. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

__all__ = ["QKVSample", "load_minilm", "load_qkv"]

_ARRAYS = ("q", "k", "v")
_REQUIRED = _ARRAYS + ("tokens", "token_strs", "doc_ptr", "doc_names", "doc_texts", "layers",
                       "model", "model_package", "text_source", "text_license")


@dataclass(frozen=True)
class QKVSample:
    """Attention queries, keys and values of one model on one or more documents.

    All arrays are read-only.

    Attributes
    ----------
    q, k, v : ndarray of shape (n_layers, n_heads, n_tokens, head_dim)
        Queries ``X W_q^T + b_q``, keys and values of each layer and head, taken
        after the linear projections and before the ``1/sqrt(head_dim)`` scaling
        and the softmax. The token axis concatenates the documents; a query of
        document ``i`` attends only to the keys of document ``i``.
    tokens : ndarray of shape (n_tokens,), int32
        WordPiece token ids, ``[CLS] ... [SEP]`` for each document.
    token_strs : ndarray of shape (n_tokens,), str
        The WordPiece strings of ``tokens``.
    doc_ptr : ndarray of shape (n_docs + 1,), int64
        Document ``i`` is the token range ``doc_ptr[i]:doc_ptr[i + 1]``.
    doc_names, doc_texts : tuple of str, length n_docs
        Where each document comes from, and its full (untruncated) text.
    layers : ndarray of shape (n_layers,), int32
        The 0-based encoder layers that were kept.
    model, model_package, text_source, text_license : str
        Provenance metadata.
    extra : dict
        Any further arrays of the archive (e.g. ``embedding``, ``command``).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    tokens: np.ndarray
    token_strs: np.ndarray
    doc_ptr: np.ndarray
    doc_names: tuple
    doc_texts: tuple
    layers: np.ndarray
    model: str
    model_package: str
    text_source: str
    text_license: str
    extra: dict = field(default_factory=dict, repr=False)

    n_layers = property(lambda self: self.k.shape[0], doc="Number of layers stored.")
    n_heads = property(lambda self: self.k.shape[1], doc="Number of attention heads per layer.")
    n_tokens = property(lambda self: self.k.shape[2], doc="Number of tokens over all documents.")
    head_dim = property(lambda self: self.k.shape[3], doc="Dimension of each head's queries, keys and values.")

    def __repr__(self) -> str:
        return (f"QKVSample(model={self.model!r}, layers={self.n_layers}, heads={self.n_heads}, "
                f"tokens={self.n_tokens}, head_dim={self.head_dim}, docs={len(self.doc_names)}, "
                f"dtype={self.k.dtype})")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _from_npz(fh, dtype) -> QKVSample:
    try:
        with np.load(fh, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"refusing to load a .npz that needs pickle (object arrays): {exc}") from exc
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise ValueError(f"not a q/k/v archive written by examples/extract_keys.py: missing {missing}")
    shape = data["k"].shape
    if len(shape) != 4 or any(data[a].shape != shape for a in _ARRAYS):
        raise ValueError("q, k and v must share one shape (n_layers, n_heads, n_tokens, head_dim); got "
                         + ", ".join(f"{a}{data[a].shape}" for a in _ARRAYS))
    if data["tokens"].shape != (shape[2],) or data["doc_ptr"][-1] != shape[2]:
        raise ValueError(f"tokens {data['tokens'].shape} / doc_ptr do not match {shape[2]} tokens")
    arrays = {a: _readonly(np.ascontiguousarray(data.pop(a), dtype=dtype)) for a in _ARRAYS}
    return QKVSample(
        **arrays,
        tokens=_readonly(data.pop("tokens").astype(np.int32, copy=False)),
        token_strs=_readonly(data.pop("token_strs")),
        doc_ptr=_readonly(data.pop("doc_ptr").astype(np.int64, copy=False)),
        doc_names=tuple(str(s) for s in data.pop("doc_names")),
        doc_texts=tuple(str(s) for s in data.pop("doc_texts")),
        layers=_readonly(data.pop("layers").astype(np.int32, copy=False)),
        model=str(data.pop("model")),
        model_package=str(data.pop("model_package")),
        text_source=str(data.pop("text_source")),
        text_license=str(data.pop("text_license")),
        extra={name: _readonly(a) for name, a in data.items()},
    )


def _check_dtype(dtype, caller: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{caller}: dtype must be float16, float32 or float64. Got {dt} instead.")
    return dt


def load_qkv(path: str | os.PathLike, *, dtype=np.float64) -> QKVSample:
    """Load a q/k/v archive written by ``examples/extract_keys.py``.

    Parameters
    ----------
    path : str or path-like
        The ``.npz`` file. It is opened with ``allow_pickle=False``.
    dtype : {float64, float32, float16}, default float64
        dtype of the returned ``q``, ``k`` and ``v``.

    Returns
    -------
    QKVSample
        ``q``, ``k``, ``v`` of shape (n_layers, n_heads, n_tokens, head_dim), read-only.

    Raises
    ------
    ValueError
        If the archive holds object arrays (it would need pickle) or lacks the
        arrays of the layout.
    """
    dt = _check_dtype(dtype, "load_qkv")
    with open(os.fspath(path), "rb") as fh:
        return _from_npz(fh, dt)


@functools.lru_cache(maxsize=4)
def _load_embedded(dtype_str: str) -> QKVSample:
    ref = resources.files("streamlev") / "data" / "minilm_qkv.npz"
    with ref.open("rb") as fh:
        return _from_npz(fh, np.dtype(dtype_str))


def load_minilm(*, dtype=np.float64) -> QKVSample:
    """Real attention queries, keys and values of all-MiniLM-L6-v2 (embedded, offline).

    One passage of 256 WordPiece tokens (the model's default maximum sequence
    length) from the CPython standard library (``heapq.__about__``, an essay on
    heaps by Francois Pinard; PSF-2.0 license), run through
    ``sentence-transformers/all-MiniLM-L6-v2`` (Apache-2.0). The model uses
    learned absolute position embeddings added to its input, so there is no
    rotary embedding to apply to ``q`` or ``k``. Stored as float16 (relative
    rounding error <= 5e-4); see ``streamlev/data/PROVENANCE.md``.

    Parameters
    ----------
    dtype : {float64, float32, float16}, default float64
        dtype of the returned ``q``, ``k`` and ``v``.

    Returns
    -------
    QKVSample
        ``q``, ``k``, ``v`` of shape (6, 12, 256, 32) = (layers, heads, tokens,
        head_dim), read-only; ``tokens`` (256,) int32; metadata as ``str``.
        The result is cached: the same read-only object is returned each call.

    Examples
    --------
    >>> from streamlev.datasets import load_minilm
    >>> s = load_minilm()
    >>> s.k.shape, s.k.dtype
    ((6, 12, 256, 32), dtype('float64'))
    >>> s.model
    'sentence-transformers/all-MiniLM-L6-v2'
    >>> keys = s.k[0, 3]          # layer 0, head 3: 256 keys in R^32
    >>> keys.shape
    (256, 32)
    """
    return _load_embedded(_check_dtype(dtype, "load_minilm").str)
