"""The scaled triangular factor of all rows seen: R with R^T R = 4**-e * K^T K, and its exponent e.

Shared by every sketch that keeps the Gram matrix exactly (LevSketch, LpSketch
for p <= 2) and by the offline :func:`streamlev.leverage.leverage_scores`: one
place that scales blocks into a safe exponent range, folds them into R, and
scores rows against it. Stored rows live at the same scale 2**-e.
"""

from __future__ import annotations

import numpy as np

from . import _factor, _parallel
from ._constants import CHUNK_ROWS, MAX_SCALE_EXP, NO_DATA_EXP, SAFE_EXP
from ._kernels.rank_one import abs_max
from ._kernels.row_norms import row_sq_norms
from ._scaling import pow2_exponent

__all__ = ["ScaledFactor", "check_scaled_state"]

_TINY = np.finfo(np.float64).tiny


def _abs_max(B: np.ndarray) -> float:
    """max |B| (NaN if B holds a NaN): two reductions on the caller's dtype, no temporaries."""
    return float(np.maximum(np.max(B), -np.min(B)))


class ScaledFactor:
    """R (d x d, upper triangular, non-negative diagonal) and the scale exponent e of the stored data.

    Parameters
    ----------
    d : int
        Row dimension.
    keep_unscaled : bool, default=True
        Rows within ``2**+-SAFE_EXP`` are stored as they are (e = 0, no scaling
        pass); otherwise every block is scaled so its largest entry is below 1.
    """

    __slots__ = ("R", "e", "keep_unscaled")

    def __init__(self, d: int, *, keep_unscaled: bool = True):
        self.R = np.zeros((d, d))
        self.e = NO_DATA_EXP
        self.keep_unscaled = keep_unscaled

    def snapshot(self) -> tuple:
        return self.R.copy(), self.e

    def restore(self, snap: tuple) -> None:
        self.R, self.e = snap

    def unscaled(self, X: np.ndarray) -> np.ndarray:
        """Stored (scaled) rows back at the original scale (a new array)."""
        return np.ldexp(X, self.e)

    def gram(self, has_data: bool) -> np.ndarray:
        """K^T K of all rows seen at the original scale, shape (d, d) (a new array)."""
        R = np.ldexp(self.R, self.e) if has_data else self.R
        return R.T @ R

    def prepare(self, B: np.ndarray, has_data: bool, caller: str) -> tuple[np.ndarray, int]:
        """Check a block and return ``(X, e)``: X = B * 2**-e in float64 with e >= self.e; mutates nothing.

        Raises ValueError for NaN/Inf and for blocks more than 2**1000 away from the
        data already folded in (float64 cannot hold both).
        """
        if B.shape[0] == 1:
            amax = abs_max(B[0].astype(np.float64, copy=False))  # one numba call on the decode path
        else:
            amax = _abs_max(B)
        e = self._exponent(B, amax, has_data, caller)
        if amax == 0.0:
            return np.zeros(B.shape), self.e
        if e == 0:
            return np.ascontiguousarray(B, dtype=np.float64), e  # no copy for C-ordered float64 input
        return self._scaled(B, B.astype(np.float64), e, amax, caller), e

    def prepare_block(self, B: np.ndarray, has_data: bool, caller: str, workers: int = 1):
        """:meth:`prepare` for a block of rows, on ``workers`` threads, with what scoring and folding need next.

        Returns ``(X, e, sq, gram)``. ``sq`` holds the squared row norms of X. ``gram`` is
        X^T X summed over the same row parts as :func:`streamlev._factor.update_factor`
        takes, so folding it gives the same R bit for bit; it is None when the block is
        too small to split. Each part widens its rows, takes their max/min, their norms
        and its share of X^T X in one go, so all of that runs on both threads instead of
        the copy and reductions running serially before a split Gram matrix.
        """
        m, d = B.shape
        if m < 2:
            X, e = self.prepare(B, has_data, caller)
            return X, e, np.einsum("ij,ij->i", X, X), None
        own = B.dtype == np.float64 and B.flags.c_contiguous  # used as it is, as prepare does
        X = B if own else np.empty((m, d))
        sq = np.empty(m)
        k = _parallel.parts(m, d * d, workers)

        def part(a, b):
            hi, lo = np.max(B[a:b]), np.min(B[a:b])
            if not own:
                X[a:b] = B[a:b]
            row_sq_norms(X[a:b], sq[a:b])
            if k == 1:
                return hi, lo, None
            with np.errstate(over="ignore", invalid="ignore"):  # such a Gram has e != 0 and is dropped below
                return hi, lo, _factor.gram(X[a:b])

        res = _parallel.map_ranges(part, m, k)
        amax = float(np.maximum(np.max([r[0] for r in res]), -np.min([r[1] for r in res])))  # NaN propagates
        e = self._exponent(B, amax, has_data, caller)
        if amax == 0.0:
            return np.zeros(B.shape), self.e, np.zeros(m), None
        if e != 0:  # rare: scale, and let the fold take X^T X at the new scale
            X = self._scaled(B, X.copy() if own else X, e, amax, caller)
            return X, e, np.einsum("ij,ij->i", X, X), None
        gram = None
        if k > 1:
            gram = res[0][2]
            for r in res[1:]:
                gram += r[2]
        return X, 0, sq, gram

    def _exponent(self, B: np.ndarray, amax: float, has_data: bool, caller: str) -> int:
        """The exponent e of a block whose largest magnitude is amax; raises for NaN/Inf or an unsafe range."""
        if not np.isfinite(amax):  # NaN or Inf anywhere propagates into max/min
            bad = int((~np.isfinite(B)).any(axis=1).sum())
            raise ValueError(f"{caller}: keys contain NaN or Inf in {bad} rows of a chunk of {B.shape[0]}. "
                             "Remove or fix those rows; the sketch was left unchanged.")
        if amax == 0.0:
            return self.e
        be = pow2_exponent(amax)
        if has_data and be > self.e + 1000 and self._tiny_after(self.e - be):
            raise ValueError(f"{caller}: new keys are too large relative to earlier keys for float64 "
                             f"(block max {amax:.3g} vs sketch scale 2^{self.e}); rescale the input.")
        return max(self.e, be if (abs(be) > SAFE_EXP or not self.keep_unscaled) else 0)

    def _scaled(self, B: np.ndarray, X: np.ndarray, e: int, amax: float, caller: str) -> np.ndarray:
        """X (a float64 copy of B) times 2**-e, in place; raises if a nonzero row of B vanished."""
        np.ldexp(X, -e, out=X)
        if pow2_exponent(amax) < e - 1000 and np.any(np.any(B != 0, axis=1) & ~np.any(X != 0, axis=1)):
            raise ValueError(f"{caller}: keys are too small relative to earlier keys for float64 "
                             f"(block max {amax:.3g} vs sketch scale 2^{self.e}); rescale the input.")
        return X

    def _tiny_after(self, shift: int) -> bool:
        diag = np.abs(np.diag(self.R))
        diag = diag[diag > 0]
        return bool(diag.size and np.ldexp(diag.min(), shift) < _TINY)

    def rescale(self, new_e: int, rows: np.ndarray | None, has_data: bool, caller: str, live: int | None = None):
        """Move to exponent ``new_e >= e``; returns ``(rows rescaled, shift)`` (shift <= 0).

        ``rows`` are stored rows at the old scale, of which the first ``live`` (default all) are in use.
        """
        shift = self.e - new_e
        if has_data and shift:
            if self._tiny_after(shift):
                raise ValueError(f"{caller}: keys are too large relative to earlier keys for float64 "
                                 f"(more than 2^1000 apart; scale exponent {self.e} -> {new_e}).")
            self.R = np.ldexp(self.R, shift)
            if rows is not None:
                rows = np.ldexp(rows, shift)
                used = rows[: rows.shape[0] if live is None else live]
                if used.shape[0] and np.any(np.all(used == 0, axis=1)):  # retained rows are never zero
                    raise ValueError(f"{caller}: keys are too large relative to retained keys for float64.")
        self.e = new_e
        return rows, shift

    def fold(self, X: np.ndarray, workers: int = 1, gram: np.ndarray | None = None) -> float:
        """R^T R += X^T X for scaled rows X (``workers`` threads for a large X, or X^T X given as ``gram``);
        returns cond of the new R."""
        self.R, kappa = _factor.update_factor(self.R, X, return_kappa=True, workers=workers, gram=gram)
        return kappa

    def score_original(self, K: np.ndarray, rtol: float, chunk: int = CHUNK_ROWS) -> np.ndarray:
        """Leverage of arbitrary rows K (original scale) against all rows folded in."""
        kappa = _factor.cond_estimate(self.R)
        out = np.empty(K.shape[0])
        for s in range(0, K.shape[0], chunk):
            X = np.ldexp(K[s : s + chunk].astype(np.float64), -self.e)
            out[s : s + chunk] = _factor.score_rows(self.R, X, rtol, kappa=kappa)
        return out


def check_scaled_state(R, K, n: int, e: int, d: int, caller: str, *, positive_diagonal: bool = True) -> None:
    """Raise ValueError unless (R, stored rows K, n, e) can have been written by a sketch."""
    if not (NO_DATA_EXP <= e <= MAX_SCALE_EXP):
        raise ValueError(f"{caller}: inconsistent sizes (n={n}, retained={K.shape[0]}, scale={e}).")
    if not (np.isfinite(R).all() and np.isfinite(K).all()) or np.any(np.tril(R, -1) != 0) \
            or (positive_diagonal and np.any(np.diag(R) < 0)):
        raise ValueError(f"{caller}: the factor R is not a finite upper-triangular matrix with a non-negative "
                         "diagonal (or the keys are not finite).")
    # Stored keys are scaled below 2**(SAFE_EXP+1) in absolute value and R^T R is their Gram
    # matrix, so a genuine sketch has |K| < 2**(SAFE_EXP+1) and ||R||_F^2 <= n d 4**(SAFE_EXP+1).
    top = 2.0 ** (SAFE_EXP + 1)
    with np.errstate(over="ignore"):  # an overflow here is exactly what this check reports
        fro2 = float(np.sum((R / top) ** 2))
    if K.size and float(np.max(np.abs(K))) >= top:
        raise ValueError(f"{caller}: stored keys exceed the scaled range; the bytes were not written by streamlev.")
    if not np.isfinite(fro2) or fro2 > n * d * (1.0 + 1e-6):
        raise ValueError(f"{caller}: the factor's norm ({fro2:.3g}) exceeds what {n} scaled keys of dimension {d} "
                         "can produce; the bytes are corrupt.")
