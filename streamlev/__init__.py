"""streamlev: one-pass, mergeable universal sets of attention keys.

Every key that can receive attention share >= eps from *any* query (for
f(x) = |x|^p attention) is kept, in memory independent of the stream length.
See the README and ``docs/`` for the guarantee and its limits.
"""

from __future__ import annotations

from .attention import RestrictionCost, heavy_attention, lev_attention, restriction_cost, select_keys
from .decode_engine import BatchChanges, DecodeEngine
from .embedding import LpEmbedding
from .leverage import leverage_scores, universal_set
from .lewis import lewis_weights, sensitivity_upper_bounds
from .lp import LpSketch
from .multihead import MultiHeadSketch
from .query_sketch import QuerySketch
from .selectors import ShiftInvariantSketch
from .sensitivity import sensitivities
from .sketch import Changes, LevSketch

__version__ = "0.1.0"

__all__ = ["leverage_scores", "universal_set", "lewis_weights", "sensitivities", "sensitivity_upper_bounds",
           "LevSketch", "DecodeEngine", "BatchChanges", "LpSketch", "LpEmbedding", "MultiHeadSketch", "ShiftInvariantSketch", "QuerySketch", "Changes", "heavy_attention", "lev_attention",
           "restriction_cost", "select_keys", "RestrictionCost", "__version__"]
