"""The memory store's map of customer key to state bytes, read and written a batch at a time.

:class:`StateIndex` is a dict of ``bytes`` keys with batch methods: the processor reads a batch's
states with :meth:`~StateIndex.get_many` and the table writes them back with
:meth:`~StateIndex.set_many`, so that a store able to do a batch faster than key by key can stand
behind the same calls. A state table in C that overlapped a batch's cache misses was measured here
and removed (docs/performance.md, "Measured alternatives, rejected").

Keys are exact ``bytes``; values any objects. Everything else works as on a dict, for Faust's
recovery, the clock and the web API.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_ABSENT: Any = object()


class StateIndex(dict):  # type: ignore[type-arg]
    """A dict of customer key to state, with the batch reads and writes the store uses."""

    __slots__ = ()

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """The value of each key (None where absent), in order."""
        get = self.get
        return [get(key) for key in keys]

    def set_many(self, keys: Sequence[bytes], values: Sequence[Any]) -> list[int]:
        """Set each key to its value, in order; the indices, in ``keys``, of the keys that were new."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        new: list[int] = []
        for i, (key, value) in enumerate(zip(keys, values)):
            if type(key) is not bytes:
                raise TypeError(f"StateIndex keys are bytes, not {type(key).__name__}")
            held = len(self)
            self[key] = value
            if len(self) != held:
                new.append(i)
        return new

    def delete_many(self, keys: Iterable[bytes]) -> int:
        """Remove each key present; how many were."""
        removed = 0
        for key in list(keys):
            if self.pop(key, _ABSENT) is not _ABSENT:
                removed += 1
        return removed
