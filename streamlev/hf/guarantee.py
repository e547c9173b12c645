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

Accuracy: scores come from a float64 Cholesky factor of the Gram matrix, so
their relative error is about ``u * cond(K)^2`` (the SVD reference has
``u * cond(K)``); keys within that distance of eps may be classified
differently from :func:`streamlev.universal_set` on ill-conditioned keys.
"""

from __future__ import annotations

import torch

from ..reference import DEFAULT_RTOL

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
        self.gram = torch.zeros(self.sketches, self.d, self.d, dtype=torch.float64, device=device)
        self.n = 0

    @property
    def nbytes(self) -> int:
        """Bytes of state (the S Gram matrices)."""
        return self.gram.numel() * self.gram.element_size()

    def _check(self, keys):
        if keys.ndim != 3 or keys.shape[0] != self.sketches or keys.shape[2] != self.d:
            raise ValueError(f"ExactLeverageSet: keys must have shape ({self.sketches}, t, {self.d}); "
                             f"got {tuple(keys.shape)}.")
        return keys.to(torch.float64)

    def observe(self, keys: torch.Tensor) -> None:
        """Fold keys (S, t, d) into the Gram matrices."""
        K = self._check(keys)
        self.gram += K.transpose(1, 2) @ K
        self.n += K.shape[1]

    def _factor(self, gram):
        lam = (self.rtol ** 2) * torch.diagonal(gram, dim1=1, dim2=2).sum(-1)
        eye = torch.eye(self.d, dtype=torch.float64, device=gram.device)
        lam = torch.where(lam > 0, lam, torch.finfo(torch.float64).tiny)
        return torch.linalg.cholesky(gram + lam[:, None, None] * eye)

    def leverage(self, keys: torch.Tensor) -> torch.Tensor:
        """Leverage (S, n) float64 of keys (S, n, d) w.r.t. all keys observed so far."""
        X = self._check(keys)
        if X.shape[1] == 0:
            return X.new_zeros(self.sketches, 0)
        Y = torch.linalg.solve_triangular(self._factor(self.gram), X.transpose(1, 2), upper=False)
        return (Y * Y).sum(1)

    def prefix_leverage(self, keys: torch.Tensor, *, chunk: int = 16) -> torch.Tensor:
        """Leverage (S, t) of each new key w.r.t. the keys observed before it and itself; folds the keys in.

        In chunks of ``chunk`` keys: with ``C C^T = G + lam I`` (G the Gram of the
        keys before the chunk, lam from the Gram including the chunk) and
        ``y_i = C^{-1} k_i``, the Cholesky factor L of ``I + Y^T Y`` (rows in order)
        has ``L_jj^2 = 1 + y_j^T (I + sum_{i<j} y_i y_i^T)^{-1} y_j``, so the prefix
        leverage is ``1 - 1/L_jj^2`` (Sherman-Morrison), exact in exact arithmetic.
        """
        K = self._check(keys)
        out = []
        eye_c = None
        for a in range(0, K.shape[1], chunk):
            Kc = K[:, a:a + chunk]
            gram_after = self.gram + Kc.transpose(1, 2) @ Kc
            lam = (self.rtol ** 2) * torch.diagonal(gram_after, dim1=1, dim2=2).sum(-1)
            lam = torch.where(lam > 0, lam, torch.finfo(torch.float64).tiny)
            C = torch.linalg.cholesky(self.gram + lam[:, None, None] * torch.eye(self.d, dtype=torch.float64,
                                                                                 device=K.device))
            Y = torch.linalg.solve_triangular(C, Kc.transpose(1, 2), upper=False)  # (S, d, c)
            if eye_c is None or eye_c.shape[0] != Kc.shape[1]:
                eye_c = torch.eye(Kc.shape[1], dtype=torch.float64, device=K.device)
            L = torch.linalg.cholesky(eye_c + Y.transpose(1, 2) @ Y)
            out.append(1.0 - 1.0 / torch.diagonal(L, dim1=1, dim2=2) ** 2)
            self.gram = gram_after
            self.n += Kc.shape[1]
        return torch.cat(out, dim=1) if out else K.new_zeros(self.sketches, 0)
