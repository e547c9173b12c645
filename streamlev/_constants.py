"""Every tunable number of streamlev, in one place, each with the reason for its value.

Core layer: imported by any module, imports nothing of streamlev.
"""

from __future__ import annotations

import numpy as np

# ---- numerical definition of leverage (see streamlev.reference for the ridge)
DEFAULT_RTOL = 1e-13  # relative ridge: tau_j = k_j^T (K^T K + lam I)^-1 k_j, lam = (rtol ||K||_F)^2
EPS_MIN = 2.0**-52  # leverage is computed to ~1e-12 at best; below machine epsilon eps is meaningless
U = float(np.finfo(np.float64).eps)  # unit roundoff used in rounding-band bounds

# ---- block path of the sketches
CHUNK_ROWS = 4096  # BLAS-3 sweet spot on a small machine (see benchmarks/bench_block.py)
RESCORE_RATIO = 8  # re-score retained keys once 8x as many new rows arrived: <= 1/8 extra scoring work

# ---- rank-one (decode) path of LevSketch
DECODE_MAX_ROWS = 8  # blocks this small go through the rank-one (decode) path
KAPPA_DECODE = 1e4  # rank-one score updates are used only below this condition number
MARGIN_REFRESH = 1e-6  # exact refresh once the rank-one rounding band is this wide (after >= max(32, d) steps) ...
REFRESH_STEPS = 8192  # ... or after this many rank-one steps, whichever comes first
SVD_MAX_D = 256  # the rank-one path measures kappa with an O(d^3) SVD up to this d

# ---- power-of-two scaling of stored keys
SAFE_EXP = 250  # keys within 2**+-SAFE_EXP are stored unscaled
SAFE_LO, SAFE_HI = 2.0 ** -(SAFE_EXP + 1), 2.0**SAFE_EXP  # max |key| with frexp exponent in [-SAFE_EXP, SAFE_EXP]
NO_DATA_EXP = -1100  # scale exponent of an empty sketch (below any float64 exponent)
MAX_SCALE_EXP = 1100  # largest scale exponent a serialized sketch may claim

# ---- heavy attention entries
BLOCK_ELEMS = 1 << 21  # score entries held per query block (16 MB of float64): cache-friendly, bounded memory
CANDIDATE_SLACK = 1e-3  # keys this close below eps are scored too: rounding in tau can never lose an entry

# ---- l_p sketch
LEWIS_FAST_TOL = 1e-3  # Lewis residual for routine pruning; bounds stay certified whatever the residual
LEWIS_TIGHT_TOL = 1e-11  # used when loose bounds would exceed the a-priori size bound

# ---- softmax selectors
NORM_FLOOR = 1e-12  # KeyDiff: norms below this count as this (zero keys get cosine 0, not NaN); see keydiff_scores
SINKS = 4  # attention sinks kept by causal budgets (StreamingLLM, Xiao et al. 2023, keeps 4 initial tokens)
RECENT_FRACTION = 0.25  # share of a causal budget given to the most recent keys (see budget_split)
# SoftmaxSelector defaults (issue #16), each chosen on MiniLM + SmolLM2 and confirmed on a ViT and Gemma 3
QUERY_HALF_LIFE = 128.0  # causal query class: a query's weight halves every 128 positions of age
QUERY_BUFFER = 512  # observed query positions the "observed" rule keeps (2^-4 weight at the oldest)
KEY_RECENT_FRACTION = 0.5  # causal key-only class: share of the budget for the most recent keys

# ---- memory
MAX_STATE_BYTES = 1 << 40  # refuse to allocate sketch state larger than this (1 TiB): a clear ValueError first
