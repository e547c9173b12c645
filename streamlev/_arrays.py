"""numpy / torch interchange at the public boundary (torch stays optional and lazily imported).

Inputs may be numpy arrays (float16/32/64, integers) or CPU torch tensors
(including bfloat16, which numpy lacks: converted to float32). Results are
numpy, and are handed back as torch tensors when the caller passed torch.
"""

from __future__ import annotations

import numpy as np

from ._validation import _check_real_array

__all__ = ["is_torch", "as_real_array", "like_input"]


def is_torch(x) -> bool:
    """True for a torch tensor, detected without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "cpu")


def as_real_array(x, *, name: str, caller: str, ndim: tuple = (2,), check_finite: bool = True) -> np.ndarray:
    """Return ``x`` as a real numpy array (float16/32/64 keep their dtype; ints become float64).

    Raises TypeError for non-real dtypes and ValueError for a wrong number of
    dimensions or (when ``check_finite``) NaN/Inf entries.
    """
    arr = _check_real_array(x, name=name, caller=caller)
    if arr.ndim not in ndim:
        want = " or ".join(f"{k}-D" for k in ndim)
        raise ValueError(f"{caller}: {name} must be {want}; got an array of shape {arr.shape}.")
    if arr.dtype.kind in "iu" or arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float64)
    if check_finite and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{caller}: {name} contains NaN or Inf ({int((~np.isfinite(arr)).sum())} entries); "
                         "remove or fix them.")
    return arr


def like_input(result: np.ndarray, template):
    """Return ``result`` as a CPU torch tensor of ``template``'s float dtype if ``template`` is torch (as torch ops do)."""
    if not is_torch(template):
        return result
    import torch  # lazily: torch is an optional extra

    out = torch.from_numpy(np.ascontiguousarray(result))
    if template.is_floating_point():
        out = out.to(template.dtype)  # computed in float64, rounded once to the caller's dtype
    return out
