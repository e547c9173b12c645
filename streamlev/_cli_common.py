"""Pieces shared by the ``streamlev`` subcommands: the user-error type, bounds, selection, safe writes."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from . import LevSketch, LpSketch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
INT64_MAX = int(np.iinfo(np.int64).max)


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


def bound_exponent(p: float) -> float:
    return max(1.0, p / 2.0)


def bound_text(p: float) -> str:
    e = bound_exponent(p)
    return "floor(d/eps)" if e == 1.0 else f"floor(d^{e:g}/eps)"


def max_retained(d: int, eps: float, p: float) -> int:
    return LevSketch.max_retained(d, eps) if p == 2.0 else LpSketch.max_retained(d, eps, p)


def make_sketch(d: int, eps: float, p: float):
    try:
        return LevSketch(d, eps) if p == 2.0 else LpSketch(d, eps, p=p)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # never leave a half-written sketch under the final name
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise CLIError(f"cannot write {path}: {exc.strerror or exc}") from None


def pick(ids, scores, eps: float, budget: int | None):
    """The ids (sorted) with score >= eps, cut to the ``budget`` largest scores (ties to the smaller id)."""
    keep = scores >= eps
    ids, scores = ids[keep], scores[keep]
    if budget is not None and ids.size > budget:
        top = np.lexsort((ids, -scores))[:budget]
        top.sort()
        ids, scores = ids[top], scores[top]
    return ids, scores


def budget_note(budget, ids, scores, eps, passes=1):
    if budget is None:
        return ""
    how = f" ({passes} passes over the file, lowering eps to {eps:.3g})" if passes > 1 else ""
    if ids.size < budget:
        return (f"; only {ids.size} keys have score >= eps = {eps:.3g}, fewer than --budget {budget}{how}"
                + (" (pass a smaller --eps to rank more)" if not how else ""))
    return f"; top {budget}: the keys with score >= {scores.min():.6g}{how}"
