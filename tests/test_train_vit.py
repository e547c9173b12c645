"""examples/train_vit.py runs end to end on a tiny config (one short epoch), so the example cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_vit.py"


def _load():
    spec = importlib.util.spec_from_file_location("_train_vit", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_gives_finite_accuracies_and_merges(tmp_path):
    ex = _load()
    out = tmp_path / "r.json"
    res = ex.main(["--seeds", "0", "--epochs", "1", "--train-limit", "48", "--test-limit", "40", "--dim", "16", "--depth", "1",
                   "--heads", "2", "--budgets", "8", "--json", str(out)])
    assert res["config"]["tokens"] == 65  # >= 64 patch tokens + CLS
    (row,) = res["runs"]
    for key in ("softmax", "lev8_trained", "lev8_swapped"):
        assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0
        assert math.isfinite(res["summary"][key]["ratio_to_softmax"])
    merged = ex.main(["--merge", str(out), str(out)])  # per-seed files summarize together
    assert len(merged["runs"]) == 2 and merged["summary"]["softmax"]["std"] == 0.0
    assert json.loads(out.read_text())["runs"] == res["runs"]


def test_swap_keeps_weights_and_selects_top_k():
    import torch

    ex = _load()
    torch.manual_seed(0)
    m = ex.build_vit(image=16, patch=2, dim=16, depth=1, heads=2)
    lev = ex.with_levattention(m, 8)
    a, b = m.state_dict(), lev.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 1, 16, 16)
    h = lev.blocks[0].ln1(torch.cat([lev.cls.expand(2, -1, -1), lev.embed(
        x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, -1, 4))], 1) + lev.pos)
    kept = lev.blocks[0].attn.select(h)
    assert kept.shape == (2, 2, 65) and (kept.sum(-1) == 8).all() and kept[..., 0].all()  # CLS always kept
