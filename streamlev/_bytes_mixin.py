"""Copying and pickling through the byte format, shared by every sketch class."""

from __future__ import annotations


def _rebuild(cls, data):
    return cls.from_bytes(data)


class ByteRoundTrip:
    """Mixin: ``copy``, ``copy.copy``, ``copy.deepcopy`` and pickle all go through ``to_bytes``/``from_bytes``.

    One path for every way a sketch leaves the process or is duplicated, so
    pickles carry the same checked, versioned format as ``to_bytes``.
    """

    def copy(self):
        """An independent copy (through the byte format)."""
        return type(self).from_bytes(self.to_bytes())

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_rebuild, (type(self), self.to_bytes()))
