"""The memory store's map of customer key to state bytes, read and written a batch at a time.

A worker grading a million customers spent half of what an event costs more there than among ten
thousand in two dict operations per customer: the read of its state and the write of the new one
(docs/performance.md, "The state table in C"). A dict lookup is a chain of dependent cache misses (index slot, entry,
stored key, value) and CPython runs one at a time, so a batch's 2,000 lookups wait for their misses
one behind another. :class:`StateIndex` is a mapping of ``bytes`` keys whose :meth:`get_many` and
:meth:`set_many` look a whole batch up in stages, each stage's misses overlapping: an
open-addressing table in C (``streams/_statetable.c``, built by ``make compile`` with the compiled
hot path). A batch of 2,000 reads at a million customers takes ~115 ns per key against ~600 for a
dict, and its write-back ~55 against ~400; among ten thousand it is faster than a dict too
(``python -m bench.indexcost``, docs/performance.md, "The state table in C").

Without a C compiler, or with a build older than the sources (``schemas/compiled.py``), the same
interface runs on a dict (:class:`DictStateIndex`), as fast as the store was before.

Keys are exact ``bytes``; values any objects. Single-key access (``index[key]``, ``get``, ``in``),
iteration and ``update`` work as on a dict, for Faust's recovery, the clock and the web API;
``keys()``, ``values()`` and ``items()`` return snapshot lists.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any


class DictStateIndex(dict):  # type: ignore[type-arg]
    """The state index's interface on a plain dict: what runs without the compiled table."""

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
                raise TypeError(f"StateTable keys are bytes, not {type(key).__name__}")
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


_ABSENT: Any = object()

try:
    from streams._statetable import StateTable
except ImportError:  # not compiled (no C compiler, or a stale build): the dict
    StateTable = None
    StateIndex: Any = DictStateIndex
    COMPILED = False
else:
    class _CompiledStateIndex(StateTable, MutableMapping):  # type: ignore[misc,valid-type,type-arg]
        """The compiled table, with the rest of a mutable mapping (``pop``, ``setdefault``, ``==``)."""

        __slots__ = ()

        def __repr__(self) -> str:
            return f"StateIndex({len(self)} keys, {self.capacity} slots)"

    StateIndex = _CompiledStateIndex
    COMPILED = True
