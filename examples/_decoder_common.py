"""What the two causal-decoder extraction scripts share: the texts, the command line, RoPE and the self-check.

``extract_decoder_keys.py`` (SmolLM2) and ``extract_gemma3_keys.py`` (Gemma 3) run
the same protocol: sections of the Python language reference as documents,
queries and keys rotated by rotate-half RoPE, and a self-check that attention
recomputed from the extracted q/k/v equals the model's input of ``o_proj``.
"""

from __future__ import annotations

import argparse

import numpy as np
from extract_keys import write_qkv  # the shared archive writer, next to this file

TOPICS = ["compound", "types", "formatstrings", "specialnames", "string-methods", "debugger"]
TEXT_LICENSE = "PSF-2.0 (CPython 'pydoc_data.topics', the Python language reference text)"


def parser(description: str, *, layers: str, dtype: str) -> argparse.ArgumentParser:
    """The options both scripts take (--out, --docs, --max-tokens, --layers, --dtype), with their defaults."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--layers", default=layers)
    ap.add_argument("--dtype", default=dtype, choices=["float16", "float32"])
    return ap


def check_docs(docs: int) -> None:
    """Exit with a message unless 1 <= docs <= len(TOPICS)."""
    if not 1 <= docs <= len(TOPICS):
        raise SystemExit(f"--docs must be in 1..{len(TOPICS)}, got {docs}")


def rope(x, pos, theta):
    """Rotate-half RoPE of x (heads, n, D) at positions pos (the Llama / Gemma convention)."""
    D = x.shape[-1]
    ang = np.outer(pos, 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
    return x * cos + np.concatenate([-x[..., D // 2:], x[..., : D // 2]], -1) * sin


def attention(q, k, v, window):
    """Causal (optionally sliding-window) softmax attention, q (H, n, D), k/v (H, n, D) -> (n, H*D)."""
    H, n, D = q.shape
    lg = np.einsum("hid,hjd->hij", q, k) / np.sqrt(D)
    i, j = np.ogrid[:n, :n]
    bad = (j > i) | ((i - j >= window) if window else False)
    lg[:, bad] = -np.inf
    w = np.exp(lg - lg.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("hij,hjd->ihd", w, v).reshape(n, H * D)


def self_check(mine, ref, where: str = "") -> float:
    """Relative max error of attention recomputed from the extracted q/k/v against the model's; exit above 1e-4."""
    err = np.abs(mine - ref).max() / np.abs(ref).max()
    if err > 1e-4:
        raise SystemExit(f"self-check failed{where}: attention from extracted q/k/v differs from the model's "
                         f"({err:.1e})")
    return err


class Documents:
    """The documents read so far (tokens, names, texts, row pointer ``ptr``) and the archive writer."""

    def __init__(self):
        self.tokens, self.names, self.texts, self.ptr = [], [], [], [0]

    def add(self, topic: str, text: str, ids) -> None:
        self.tokens.append(np.array(ids, np.int32))
        self.names.append(f"pydoc_data.topics[{topic!r}]")
        self.texts.append(text)
        self.ptr.append(self.ptr[-1] + len(ids))

    def write(self, out, arrays: dict, *, layers, model: str, package: str) -> None:
        """Write the ``.npz`` archive (:func:`extract_keys.write_qkv`) with these documents' metadata."""
        write_qkv(out, arrays, ptr=self.ptr, names=self.names, texts=self.texts, layers=layers, model=model,
                  package=package, source="CPython pydoc_data.topics", license=TEXT_LICENSE)
