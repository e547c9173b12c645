"""The method names of ``kv_cache_eval.py``: one grammar, parsed for a run and spelled out for a report.

streamlev: ``sl_<rule>[_vn][_r<P>][_pre][_win]`` with ``<rule>`` a named rule (``default``, ``expected``,
``keydiff``, ...) or ``obs<W>[s<S>][h<H>][p<K>][d<P>][n<L>][x]`` (observed attention of W queries, one per S
positions, half-life H, max-pool K, a prompt scored by its newest P queries at every position, the newest
query weighing L percent, ``x``: distance prior). kvpress: ``kv_<press>[_full]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRESS_LABELS = {"streaming_llm": "StreamingLLM", "knorm": "Knorm", "keydiff": "KeyDiff",
                "expected_attention": "ExpectedAttention", "snapkv": "SnapKV", "tova": "TOVA"}
# named streamlev rules: the selector name make_cache takes (None: built in StreamlevMethod.selector), and a label
NAMED = {"default": ("default", "default"), "expected": ("expected_attention", "expected attention (rank-8)"),
         "keydiff": ("keydiff", "KeyDiff + sinks + 25% recent"), "leverage": ("leverage", "guarantee (|x|^2 universal set)"),
         "observed": ("observed", "observed attention (#16 rule)"), "keys": ("keys", "small norm + 50% recent (#16 key-only)"),
         "streaming": ("streaming", "StreamingLLM rule (4 sinks + newest)"), "append": ("default", "default"),
         "observed_append": ("observed", "observed attention (#16 rule)"),
         "expected_append": ("expected_attention", "expected attention (rank-8)"),
         "default_exact": (None, "expected attention, exact covariance")}
_OBS = re.compile(r"obs(\d+)(?:s(\d+))?(?:h(\d+))?(?:p(\d+))?(?:d(\d+))?(?:n(\d+))?(x?)")
DEFAULT_OBS = (64, 8, 128.0, 1, False, 0, 0)  # streamlev.hf.selectors.default_selector


@dataclass(frozen=True)
class StreamlevMethod:
    """A parsed ``sl_`` name: the rule, its options, the cache mode and how sliding layers are treated."""

    rule: str  # a key of NAMED, or "obs"
    obs: tuple | None  # (buffer, stride, half_life, pool, positional, prompt_buffer, newest %) of an observed-attention rule
    value_norm: bool
    recent: int | None  # percent of the budget for the newest keys (with 4 sinks); None: the rule's own split
    mode: str  # "evict", "prefill" or "append_only"
    window: bool  # sliding layers keep their window (sliding="window")

    def selector(self):
        """The ``selector`` argument of :func:`streamlev.hf.make_cache`."""
        import streamlev.hf as slh

        S = slh.selectors
        if self.obs is not None:
            W, st, h, pool, x, dense, newest = self.obs
            return S.ObservedAttention(buffer=W, half_life=h, stride=st, value_norm=self.value_norm,
                                       sinks=4 if self.recent is not None else 0,
                                       recent_fraction=(self.recent or 0) / 100, pool=pool, positional=x,
                                       prompt_buffer=dense, newest_weight=newest / 100)
        if self.value_norm and self.rule == "expected":
            return S.ExpectedAttention(value_norm=True)
        if self.value_norm and self.rule in ("observed", "observed_append"):
            return S.ObservedAttention(value_norm=True)
        if self.rule == "default_exact":
            return S.ExpectedAttention(cov_rank=None)
        return NAMED[self.rule][0]


def parse(method: str) -> StreamlevMethod:
    """The :class:`StreamlevMethod` of an ``sl_`` name; ValueError names the grammar."""
    if not method.startswith("sl_"):
        raise ValueError(f"not a streamlev method: {method!r}")
    base = method[3:]
    window = base.endswith("_win")
    base = base[:-4] if window else base
    pre = base.endswith("_pre")
    base = base[:-4] if pre else base
    rec = re.search(r"_r(\d+)$", base)
    base = base[: rec.start()] if rec else base
    vn = base.endswith("_vn")
    base = base[:-3] if vn else base
    m = _OBS.fullmatch(base)
    if m:
        W, st = int(m[1]), int(m[2] or 1)
        obs = (W, st, float(m[3] or W * st / 4), int(m[4] or 1), bool(m[7]), int(m[5] or 0), int(m[6] or 0))
        rule = "obs"
    elif base in NAMED:
        obs, rule = None, base
        if rec or (vn and base not in ("expected", "observed", "observed_append")):
            raise ValueError(f"{method!r}: _r<P> applies to obs rules only, _vn to obs, expected and observed")
    else:
        raise ValueError(f"unknown streamlev method {method!r}: expected sl_<rule>[_vn][_r<P>][_pre][_win] with <rule> "
                         f"one of {', '.join(NAMED)} or obs<W>[s<S>][h<H>][p<K>][d<P>][n<L>][x]")
    mode = "append_only" if base.endswith("append") else "prefill" if pre else "evict"
    return StreamlevMethod(rule, obs, vn, int(rec[1]) if rec else None, mode, window)


def label(method: str) -> str:
    """A readable name for tables and legends."""
    if method == "full":
        return "full cache"
    if method.startswith("kv_"):
        full = method.endswith("_full")
        press = method[3:-5] if full else method[3:]
        form = " (full-attention layers, prefill form)" if full else " (prefill form)" if press == "snapkv" else ""
        return f"kvpress {PRESS_LABELS.get(press, press)}{form}"
    try:
        s = parse(method)
    except ValueError:
        return method
    if s.obs is not None:
        W, st, h, pool, x, dense, newest = s.obs
        if s.obs == DEFAULT_OBS and s.value_norm and s.recent == 50:
            text = "default"
        else:
            text = f"observed, {W} queries" + (f" every {st}th position" if st > 1 else "") + f", half-life {h:g}"
            text += ", x ||v||" if s.value_norm else ""
            text += f", 4 sinks + {s.recent}% recent" if s.recent is not None else ""
            text += f", max-pool {pool}" if pool > 1 else ""
            text += ", distance prior" if x else ""
            text += f", prompt scored by its newest {dense} queries" if dense else ""
            text += f", newest query weighs {newest}%" if newest else ""
    else:
        text = NAMED[s.rule][1] + (" x ||v||" if s.value_norm else "")
        text += f", 4 sinks + {s.recent}% recent" if s.recent is not None else ""
    text += {"evict": "", "prefill": ", prefill form", "append_only": ", append-only"}[s.mode]
    return "streamlev " + text + (", sliding layers = window" if s.window else "")
