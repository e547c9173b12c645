"""numpydoc validation of every public callable: a Parameters section matching the signature, and Returns.

Public callables: every name in the ``__all__`` of a public streamlev module, and
the public methods of the public classes (defined in streamlev, not inherited from
builtins). Checked with numpydoc's own validator (codes GL08 no docstring, PR01
parameter not documented, PR02 documented parameter not in the signature, RT01
no Returns section for a function that returns something).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import numpydoc.validate
import pytest

PUBLIC_MODULES = ["streamlev", "streamlev.attention", "streamlev.selectors", "streamlev.eval", "streamlev.leverage",
                  "streamlev.lewis", "streamlev.sensitivity", "streamlev.sketch", "streamlev.lp",
                  "streamlev.embedding", "streamlev.multihead", "streamlev.query_sketch", "streamlev.testing",
                  "streamlev.datasets", "streamlev.io", "streamlev.dask", "streamlev.reference",
                  "streamlev.softmax_selector", "streamlev.softmax_scores"]
CODES = {"GL08", "PR01", "PR02", "RT01"}


def _is_record(cls) -> bool:
    """NamedTuples, dataclasses and exceptions document Attributes, not constructor Parameters."""
    return issubclass(cls, (tuple, BaseException)) or dataclasses.is_dataclass(cls)


def public_callables() -> list[str]:
    names = set()
    for m in PUBLIC_MODULES:
        mod = importlib.import_module(m)
        for n in getattr(mod, "__all__", []):
            obj = getattr(mod, n)
            if not callable(obj) or not getattr(obj, "__module__", "").startswith("streamlev"):
                continue
            qual = f"{obj.__module__}.{obj.__qualname__}"
            if "<locals>" in qual:  # hypothesis strategies: validated through their module attribute
                qual = f"{m}.{n}"
            if not (inspect.isclass(obj) and _is_record(obj)):
                names.add(qual)
            if inspect.isclass(obj):
                for a in dir(obj):
                    if a.startswith("_"):
                        continue
                    owner = next((k for k in obj.__mro__ if a in vars(k)), None)
                    member = getattr(obj, a)
                    if owner is None or not owner.__module__.startswith("streamlev") or not callable(member):
                        continue
                    names.add(f"{obj.__module__}.{obj.__qualname__}.{a}")
    return sorted(names)


NAMES = public_callables()


class _WrapperValidator(numpydoc.validate.Validator):
    """For hypothesis ``@composite`` strategies, generated code without source: they return a strategy."""

    def __init__(self, obj_name):
        super().__init__(numpydoc.validate.get_doc_object(obj_name))

    source_file_name = property(lambda self: None)
    source_file_def_line = property(lambda self: None)
    method_source = property(lambda self: "def strategy():\n    return SearchStrategy()\n")


def _errors(name):
    try:
        return numpydoc.validate.validate(name)["errors"]
    except OSError:  # no source for the public object itself
        obj = numpydoc.validate.Validator._load_obj(name)
        assert getattr(obj, "is_hypothesis_strategy_function", False), f"{name}: no source code"
        return numpydoc.validate.validate(obj, validator_cls=_WrapperValidator)["errors"]


def test_enough_callables_are_checked():
    assert len(NAMES) > 100
    assert "streamlev.sketch.LevSketch.update" in NAMES and "streamlev.leverage.leverage_scores" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_numpydoc(name):
    errors = [f"{code}: {msg}" for code, msg in _errors(name) if code in CODES]
    assert not errors, f"{name}: " + "; ".join(errors)
