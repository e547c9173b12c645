"""``python -m streamlev``: the same command as the ``streamlev`` console script."""

from __future__ import annotations

if __name__ == "__main__":  # importing this module (e.g. by a doc tool) must not run the command
    import sys

    from streamlev.cli import main

    sys.exit(main())
