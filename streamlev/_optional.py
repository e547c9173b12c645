"""Optional third-party extras: whether they import, and the error a missing one gives.

One place for the guard that :mod:`streamlev.torch` and :mod:`streamlev.hf` share:
without the extra the module still imports (so documentation builds), and using
any of its public names raises an ImportError that says what to install.
"""

from __future__ import annotations

import importlib

__all__ = ["available", "missing_extra"]


def available(*packages: str) -> bool:
    """True if every named third-party package imports (each is imported, as a plain ``import`` would)."""
    try:
        for name in packages:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def missing_extra(module: str, names, needs: str):
    """A module-level ``__getattr__`` for ``module`` when its extra is missing.

    Parameters
    ----------
    module : str
        Dotted name of the module, e.g. ``"streamlev.torch"``.
    names : sequence of str
        Its public names (``__all__``); each raises ImportError.
    needs : str
        What to install, e.g. ``"PyTorch: pip install 'streamlev[torch]'"``.

    Returns
    -------
    callable
        ``__getattr__(name)``: ImportError for a public name, AttributeError otherwise.
    """
    public = frozenset(names)

    def __getattr__(name):
        if name in public:
            raise ImportError(f"{module}.{name} needs {needs}.")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
