"""Top-k selection, the one helper behind every ``top`` / ``select`` / budget mode of streamlev."""

from __future__ import annotations

import numpy as np

__all__ = ["top_k"]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, ties toward the earlier position, returned sorted (int64).

    Parameters
    ----------
    scores : ndarray of shape (n,)
        Finite scores (validated by the caller).
    k : int
        Number of positions wanted; ``min(k, n)`` are returned.

    Returns
    -------
    idx : ndarray of shape (min(k, n),), int64, increasing
    """
    order = np.lexsort((np.arange(scores.size), -scores))
    return np.sort(order[: max(0, int(k))]).astype(np.int64)
