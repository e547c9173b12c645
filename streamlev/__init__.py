"""streamlev: one-pass, mergeable universal sets of attention keys.

See the README and ``docs/`` for the guarantee and its limits.
"""

from __future__ import annotations

__version__ = "0.1.0"
