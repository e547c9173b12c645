"""The end-to-end benchmark's method names and report: what the documented tables are computed from."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(BENCH))
    try:
        import _kv_methods
        import kv_cache_report

        yield _kv_methods, kv_cache_report
    finally:
        sys.path.remove(str(BENCH))


def test_method_grammar(mods):
    km, _ = mods
    s = km.parse("sl_obs64s8p5d512n25x_vn_r75_pre_win")
    assert s.obs == (64, 8, 128.0, 5, True, 512, 25) and s.value_norm and s.recent == 75
    assert (s.mode, s.window) == ("prefill", True)
    assert km.parse("sl_obs32").obs == (32, 1, 8.0, 1, False, 0, 0)  # half-life W * stride / 4 unless h<H>
    assert km.parse("sl_obs64s8h16").obs[2] == 16.0
    assert km.parse("sl_append").mode == "append_only" and km.parse("sl_default").mode == "evict"
    assert km.label("sl_obs64s8_vn_r50") == km.label("sl_default") == "streamlev default"
    assert km.label("kv_snapkv_full") == "kvpress SnapKV (full-attention layers, prefill form)"
    for bad in ("sl_nothing", "sl_keydiff_r50", "sl_keys_vn", "kv_tova"):
        with pytest.raises(ValueError):
            km.parse(bad)


def test_method_selectors_match_the_library(mods):
    pytest.importorskip("torch")
    km, _ = mods
    from streamlev.hf.selectors import ObservedAttention, default_selector

    assert repr(km.parse("sl_obs64s8_vn_r50").selector()) == repr(default_selector())
    sel = km.parse("sl_obs128s4p3d256n50x").selector()
    assert isinstance(sel, ObservedAttention)
    assert (sel.buffer, sel.stride, sel.half_life, sel.pool, sel.positional, sel.sinks, sel.prompt_buffer,
            sel.newest_weight) == (128, 4, 128.0, 3, True, 0, 256, 0.5)
    assert km.parse("sl_streaming").selector() == "streaming"


def _run(doc, method, frac, kl, ppl, nbytes, top1=0.5):
    return dict(doc=doc, method=method, frac=frac, budget=int(frac * 1024), kl=kl, ppl=ppl, top1=top1, bytes=nbytes)


def test_report_aggregates_over_texts(mods, tmp_path):
    _, rep = mods
    rows = [_run("a", "full", 1.0, 0.0, 10.0, 1000), _run("/x/b", "full", 1.0, 0.0, 40.0, 2000),
            _run("a", "sl_default", 0.125, 0.2, 12.0, 100, 1.0), _run("/x/b", "sl_default", 0.125, 0.4, 48.0, 400, 0.0),
            _run("a", "kv_tova", 0.125, 0.3, 15.0, 50), _run("/x/b", "kv_tova", 0.125, 0.1, 44.0, 100),
            dict(doc="a", method="kv_knorm", frac=0.125, budget=128, error="boom")]
    by, full, docs = rep.aggregate(rows)
    assert docs == ["a", "b"] and full["n"] == 2
    assert full["ppl"] == pytest.approx(20.0)  # geometric mean
    d = by[("sl_default", 0.125)]
    assert (d["kl"], d["top1"], d["n"]) == (pytest.approx(0.3), pytest.approx(0.5), 2)
    assert d["ppl"] == pytest.approx(math.sqrt(12 * 48))
    assert d["mem"] == pytest.approx((100 / 1000 + 400 / 2000) / 2)  # each text against its own full cache
    assert ("kv_knorm", 0.125) not in by

    res = dict(model="m", context=1024, continuation=64, methods=["sl_default", "kv_tova", "kv_knorm"], ppl=rows,
               passkey=[], overhead=[], copy=[
                   dict(method="full", frac=1.0, depth=0.5, trial=0, hit=True, tokens_right=4, n_tokens=4),
                   dict(method="sl_default", frac=0.125, depth=0.5, trial=0, hit=False, tokens_right=1, n_tokens=4),
                   dict(method="sl_default", frac=0.125, depth=0.9, trial=0, hit=True, tokens_right=2, n_tokens=2)])
    table = rep.ppl_table(res)[0]
    assert "| `sl_default` | 0.300 / 24.00 / 0.50 / 0.15 |" in table and "kv_knorm @ 1/8: boom" in table
    assert table.index("`kv_tova` |") < table.index("`sl_default` |")  # sorted by mean KL (0.2 before 0.3)
    paired = rep.paired_table(res, "sl_default")
    dl = [math.log(15 / 12), math.log(44 / 48)]
    mean, se = sum(dl) / 2, abs(dl[0] - dl[1]) / 2  # the standard error of two values
    assert f"| kvpress TOVA | {mean:+.3f} ± {se:.3f} | 1/2 |" in paired
    copy = rep.copy_table(res)
    assert "| streamlev default | 0.50, 0.62 (of 2) | 50%: 0, 90%: 1 |" in copy

    p = tmp_path / "r.json"
    p.write_text(json.dumps(res))
    out = tmp_path / "t.md"
    assert rep.main([str(p), "--markdown", str(out), "--paired", "sl_default"]) == 0
    assert "2 text(s): a, b;" in out.read_text()


@pytest.mark.parametrize("name", ["smollm2_fresh8", "gemma3_fresh8", "gemma3_fresh8_streaming",
                                  "smollm2_oracle", "gemma3_oracle", "smollm2_fresh8b", "gemma3_fresh8b"])
def test_documented_tables_are_the_committed_results(mods, name):
    """Every row of the report on a committed result file stands, digit for digit, in docs/kv_cache.md."""
    _, rep = mods
    res = json.loads((BENCH / "results" / "kv_cache" / f"{name}.json").read_text())
    rows = [line for line in rep.ppl_table(res)[0].splitlines() if line.startswith("| `")]
    doc = (BENCH.parent / "docs" / "kv_cache.md").read_text(encoding="utf-8")
    assert len(rows) == len(res["methods"])
    for row in rows:
        assert row in doc, row


@pytest.mark.parametrize("name", ["smollm2_inprompt", "gemma3_inprompt", "smollm2_inprompt_lic", "gemma3_inprompt_lic"])
def test_documented_retrieval_tables_are_the_committed_results(mods, name):
    """The copy-task rows with the question in the prompt stand in docs/kv_cache.md digit for digit, and the
    report keeps them apart from rows whose question came after the context."""
    _, rep = mods
    res = json.loads((BENCH / "results" / "kv_cache" / f"{name}.json").read_text())
    assert res["copy"] and all(r.get("question") == "in_prompt" for r in res["copy"])
    assert rep.copy_table(res) == ""  # no rows of the other form
    rows = [line for line in rep.copy_table(res, "in_prompt").splitlines()[2:]]
    doc = (BENCH.parent / "docs" / "kv_cache.md").read_text(encoding="utf-8")
    assert len(rows) == 1 + len(res["methods"])
    for row in rows:
        assert row in doc, row


def test_oracle_records_the_continuations_attention_and_keeps_its_heaviest_keys():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import streamlev.hf as slh

    sys.path.insert(0, str(BENCH))
    try:
        import kv_cache_oracle as ko
    finally:
        sys.path.remove(str(BENCH))
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 97, (40,)).tolist()
    n = 32
    mass = ko.continuation_attention(model, ids, n)
    assert model.config._attn_implementation == "sdpa"  # restored after the eager pass
    # against the model's own attention weights, summed over the group (heads 0-1 -> kv 0, 2-3 -> kv 1)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    for layer, A in enumerate(att):
        want = A[0, :, n:, :n].sum(1).view(2, 2, n).sum(1)
        torch.testing.assert_close(mass[layer], want)
    # the oracle keeps the 4 sinks and, of the rest, the heaviest keys by mass * ||v||
    model.config._attn_implementation = "sdpa"
    heavy = list(range(5, 29, 2))  # 12 keys: with 4 sinks they fill a budget of 16
    mass = [torch.zeros(2, n).index_fill_(1, torch.tensor(heavy), 5.0) for _ in att]
    cache = slh.make_cache(model, 16, ko.oracle_selector(mass, n, 0.0), mode="prefill").attach(model)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids[:n]]), past_key_values=cache, use_cache=True)
        for layer in range(len(att)):
            kept = cache.kept_positions(layer)[0]
            assert {0, 1, 2, 3, *heavy} == set(kept[0].tolist()) == set(kept[1].tolist())
    finally:
        cache.detach()
