#!/usr/bin/env python3
"""Side-by-side check of streamlev.eval's re-implemented peer rules against kvpress itself.

    pip install --no-deps kvpress==0.5.4 cachetools     # torch==2.13.0 and transformers must be installed
    python benchmarks/kvpress_crosscheck.py

On every head of the embedded MiniLM sample and every budget fraction, compares the keys kept by
``streamlev.eval.keys_kept`` with the top-k of kvpress's ``KnormPress``, ``KeyDiffPress`` and
``StreamingLLMPress`` scores (must be identical), and the sketched-leverage scores with
``LeverageScorePress.compute_leverage_scores`` (kvpress draws its Gaussian sketch from torch's RNG, so
the two sketches differ; with head dim 32 <= 48 both equal the centred leverage, so the scores must
agree to float32/jitter accuracy). kvpress's package ``__init__`` imports ``datasets`` and ``fire``
for presses not used here; they are replaced by empty stand-ins when absent. Not part of the test suite.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    for mod in ("datasets", "fire"):  # imported at kvpress import time by presses we do not use
        try:
            __import__(mod)
        except ImportError:
            sys.modules[mod] = types.SimpleNamespace(load_dataset=None, Fire=None)
    import torch
    from kvpress import KeyDiffPress, KnormPress, StreamingLLMPress
    from kvpress.presses.leverage_press import LeverageScorePress

    from streamlev import eval as ev
    from streamlev.datasets import load_minilm

    s = load_minilm()
    mismatches, worst = {}, 0.0
    for L in range(s.n_layers):
        for H in range(s.n_heads):
            K = np.array(s.k[L, H], dtype=np.float64)
            kt = torch.from_numpy(K)[None, None]
            n = K.shape[0]
            for f in ev.FRACTIONS:
                for name, press in (("knorm_small", KnormPress(compression_ratio=1 - f)),
                                    ("keydiff", KeyDiffPress(compression_ratio=1 - f)),
                                    ("streaming_llm", StreamingLLMPress(compression_ratio=1 - f))):
                    b = int(n * (1 - press.compression_ratio))  # kvpress's n_kept
                    theirs = sorted(press.score(None, None, kt, kt, None, None)[0, 0].topk(b).indices.tolist())
                    ours = ev.keys_kept(name, K, b).tolist()
                    mismatches[name] = mismatches.get(name, 0) + (theirs != ours)
            torch.manual_seed(L * 100 + H)
            theirs = LeverageScorePress.compute_leverage_scores(kt.float(), 48)[0, 0].double().numpy()
            worst = max(worst, float(np.abs(theirs - ev.key_scores("sketch_leverage", K, seed=L * 100 + H)).max()))
    print(f"kept-set mismatches over {s.n_layers * s.n_heads} heads x {len(ev.FRACTIONS)} budgets: {mismatches}")
    print(f"sketched leverage: max |kvpress - streamlev.eval| = {worst:.2e} (scores are in [0, 1])")
    return 0 if not any(mismatches.values()) and worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
