"""Guarantee mode: the exact |x|^2 universal set of many heads at once, in torch (one adapter, one module).

:class:`ExactLeverageSet` keeps, for ``S`` independent key streams (e.g. every
(batch, key/value head) pair of one layer), the Gram matrix of *all* keys seen,
and answers the exact ridge leverage of any key with respect to them -- the
definition of :mod:`streamlev.reference`:

    tau(k) = k^T (K^T K + lam I)^{-1} k,   lam = (rtol * ||K||_F)^2,

with K every key of the stream so far. Leverage with respect to a growing set
of rows never increases, so a key whose leverage fell below eps can never again
reach it: dropping it never loses a member of the final universal set
``{j : tau_j(K) >= eps}``, and the set has at most ``d / eps`` keys.

The interface is deliberately narrow (construct with ``(sketches, d, eps)``,
``observe`` / ``leverage`` / ``prefix_leverage``) so that the batched engine of
:mod:`streamlev.torch_engine` can replace the Cholesky computation here.

Accuracy: the state is the triangular factor R of the keys (``R^T R = K^T K``),
updated by Householder QR, and scores are triangular solves with the factor of
``[R; sqrt(lam) I]``: backward stable, relative error about ``u * cond(K)`` as
for the SVD reference; keys within that distance of eps may be classified
differently from :func:`streamlev.universal_set`.
"""

from __future__ import annotations

import torch

from .._constants import DEFAULT_RTOL

__all__ = ["ExactLeverageSet"]


class ExactLeverageSet:
    """Exact ridge leverage of keys w.r.t. all keys seen, for ``sketches`` streams of dimension ``d``.

    Parameters
    ----------
    sketches : int
        Number of independent streams S.
    d : int
        Key dimension.
    eps : float in (0, 1]
        Threshold of the universal set.
    rtol : float, default 1e-13
        Relative ridge (as :data:`streamlev.reference.DEFAULT_RTOL`).
    device : torch device, optional

    Notes
    -----
    Guarantee: after ``observe`` of keys K_s (each stream s), ``leverage(X)[s, j]``
    is ``x_j^T (K_s^T K_s + lam_s I)^{-1} x_j`` computed in float64; keeping the
    keys with score >= eps at every step keeps exactly ``{j : tau_j(K_s) >= eps}``.
    ``prefix_leverage`` returns each new key's leverage w.r.t. the keys before it
    and itself (the admission rule of append-only caches): a key below eps there
    is below eps for every longer prefix, so it is never in the universal set.
    """

    def __init__(self, sketches: int, d: int, eps: float, *, rtol: float = DEFAULT_RTOL, device=None):
        if sketches < 1 or d < 1:
            raise ValueError(f"ExactLeverageSet: need sketches >= 1 and d >= 1, got {sketches}, {d}.")
        if not 0.0 < float(eps) <= 1.0:
            raise ValueError(f"ExactLeverageSet: eps must be in (0, 1], got {eps!r}.")
        self.sketches, self.d, self.eps, self.rtol = int(sketches), int(d), float(eps), float(rtol)
        # R with R^T R = K^T K (the keys' Gram matrix), kept by QR updates: backward stable, no Gram squaring
        self.R = torch.zeros(self.sketches, self.d, self.d, dtype=torch.float64, device=device)
        # leverage is scale-invariant; keys are stored scaled by 1/max|k| of the first non-zero block of each
        # stream so that huge or tiny keys neither overflow nor underflow the ridge (as the reference does)
        self.scale = torch.zeros(self.sketches, dtype=torch.float64, device=device)
        self.n = 0

    @property
    def nbytes(self) -> int:
        """Bytes of state (the S triangular factors and scales)."""
        return (self.R.numel() + self.scale.numel()) * self.R.element_size()

    def _check(self, keys):
        if keys.ndim != 3 or keys.shape[0] != self.sketches or keys.shape[2] != self.d:
            raise ValueError(f"ExactLeverageSet: keys must have shape ({self.sketches}, t, {self.d}); "
                             f"got {tuple(keys.shape)}.")
        K = keys.to(torch.float64)
        if K.shape[1]:
            top = K.abs().amax((1, 2))
            self.scale = torch.where((self.scale == 0) & (top > 0), 1.0 / top, self.scale)
        return K * self.scale[:, None, None]

    @staticmethod
    def _qr_r(M):
        return torch.linalg.qr(M, mode="r")[1]

    def observe(self, keys: torch.Tensor) -> None:
        """Fold keys (S, t, d) into the factors."""
        self._fold(self._check(keys))

    def _fold(self, K):
        if K.shape[1]:
            self.R = self._qr_r(torch.cat([self.R, K], dim=1))
            self.n += K.shape[1]

    def _ridge_factor(self, R):
        """Upper-triangular Rl with Rl^T Rl = R^T R + lam I, lam = (rtol ||K||_F)^2 (QR of [R; sqrt(lam) I])."""
        lam = (self.rtol ** 2) * (R * R).sum((1, 2))
        lam = torch.where(lam > 0, lam, torch.finfo(torch.float64).tiny)
        eye = torch.eye(self.d, dtype=torch.float64, device=R.device)
        return self._qr_r(torch.cat([R, lam.sqrt()[:, None, None] * eye], dim=1))

    def leverage(self, keys: torch.Tensor) -> torch.Tensor:
        """Leverage (S, n) float64 of keys (S, n, d) w.r.t. all keys observed so far."""
        X = self._check(keys)
        if X.shape[1] == 0:
            return X.new_zeros(self.sketches, 0)
        Y = torch.linalg.solve_triangular(self._ridge_factor(self.R).transpose(1, 2), X.transpose(1, 2), upper=False)
        return (Y * Y).sum(1)

    def prefix_leverage(self, keys: torch.Tensor, *, chunk: int = 16) -> torch.Tensor:
        """Leverage (S, t) of each new key w.r.t. the keys observed before it and itself; folds the keys in.

        Key by key, the leverage of the last row of ``M = [R; sqrt(lam) I; k]``
        (``R^T R`` the Gram of the earlier keys, lam from the Gram including k)
        is the squared norm of the last row of M's orthonormal factor -- stable
        even when the earlier keys are rank-deficient. Once every factor is well
        conditioned, chunks are whitened instead: with ``Rl^T Rl = R^T R + lam I``
        and ``y_i = Rl^{-T} k_i``, the Cholesky factor L of ``I + Y^T Y`` (rows in
        order) has ``L_jj^2 = 1 + y_j^T (I + sum_{i<j} y_i y_i^T)^{-1} y_j``, so the
        prefix leverage is ``1 - 1/L_jj^2`` (Sherman-Morrison).
        """
        K = self._check(keys)
        out, j, t = [], 0, K.shape[1]
        eye = torch.eye(self.d, dtype=torch.float64, device=K.device)
        while j < t:
            diag = torch.diagonal(self.R, dim1=1, dim2=2).abs()
            conditioned = bool((diag.min(-1).values > 1e-6 * diag.max(-1).values.clamp_min(1e-300)).all())
            if not conditioned:  # one key, by the orthonormal factor
                x = K[:, j:j + 1]
                R_all = torch.cat([self.R, x], dim=1)
                lam = (self.rtol ** 2) * (R_all * R_all).sum((1, 2))
                lam = torch.where(lam > 0, lam, torch.finfo(torch.float64).tiny)
                Q = torch.linalg.qr(torch.cat([self.R, lam.sqrt()[:, None, None] * eye, x], dim=1))[0]
                out.append((Q[:, -1] ** 2).sum(-1, keepdim=True))
                self.R = self._qr_r(R_all)
                self.n += 1
                j += 1
                continue
            Kc = K[:, j:j + chunk]
            lam = (self.rtol ** 2) * ((self.R * self.R).sum((1, 2)) + (Kc * Kc).sum((1, 2)))  # Gram after the chunk
            lam = torch.where(lam > 0, lam, torch.finfo(torch.float64).tiny)
            Rl = self._qr_r(torch.cat([self.R, lam.sqrt()[:, None, None] * eye], dim=1))
            Y = torch.linalg.solve_triangular(Rl.transpose(1, 2), Kc.transpose(1, 2), upper=False)  # (S, d, c)
            L = torch.linalg.cholesky(torch.eye(Kc.shape[1], dtype=torch.float64, device=K.device)
                                      + Y.transpose(1, 2) @ Y)
            out.append(1.0 - 1.0 / torch.diagonal(L, dim1=1, dim2=2) ** 2)
            self._fold(Kc)
            j += Kc.shape[1]
        return torch.cat(out, dim=1) if out else K.new_zeros(self.sketches, 0)
