"""The memory store's map of customer key to state bytes, read and written a batch at a time.

A worker grading a million customers spent half of what an event costs more there than among
ten thousand in two dict operations per customer: the read of its state and the write of the new
one (docs/performance.md §17). Each is a chain of dependent cache misses (the dict's index slot,
its entry, the stored key, the value), and CPython runs one lookup at a time, so the misses of a
batch's 2,000 customers queue one behind another. Here the same map is an open-addressing table
in NumPy arrays: a batch hashes its keys, then probes, compares and gathers them with array
operations, whose loads do not depend on each other and so overlap. A batch's write-back of the
states it read needs no second lookup: it scatters the new values to the positions the read
found, while nothing has moved since.

Each position holds a 64-bit fingerprint (the key's Python hash; 0: never used), a live flag,
the key and the value. A key is found by linear probing from ``fingerprint & mask``: a position
matches when it is live, has the fingerprint and holds an equal key (keys are always compared:
two keys may share a hash). A deleted key leaves its fingerprint behind, not live (a tombstone),
so that probes for keys placed after it go on past it; an insert takes the first position on its
path that is not live. The table doubles when more than half its positions were ever used, and
a rebuild (which drops the tombstones) leaves at most a third of them live. Positions move only
in a rebuild and are freed only by a deletion; each of those starts a new *generation*, and a
read's positions are used for a write only within the generation they were found in.

Single keys (``index[key]``, ``get``) work too, for Faust's recovery, the clock and the web API,
at the speed of a few NumPy scalar reads (~1 µs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np

_MIN_CAPACITY = 16


def _fingerprint(key: bytes) -> int:
    h = hash(key)
    return h if h != 0 else 1  # 0 marks a position never used


def _fingerprints(keys: Sequence[bytes]) -> np.ndarray:
    h = np.fromiter(map(hash, keys), np.int64, len(keys))
    h[h == 0] = 1
    return h


def _objects(items: Sequence[Any]) -> np.ndarray:
    # Element by element: np.array would read a list of bytes as one byte-string array.
    out = np.empty(len(items), object)
    out[:] = items if isinstance(items, list) else list(items)
    return out


class StateIndex(MutableMapping[bytes, Any]):
    """A mapping of ``bytes`` keys with batch reads (:meth:`get_many`) and writes
    (:meth:`set_many`) that overlap their memory accesses. Iteration order is unspecified."""

    def __init__(self, items: Mapping[bytes, Any] | Iterable[tuple[bytes, Any]] = ()) -> None:
        self._generation = 0
        self._allocate(_MIN_CAPACITY)
        self.update(items)

    def _allocate(self, capacity: int) -> None:
        self._fp = np.zeros(capacity, np.int64)
        self._live = np.zeros(capacity, np.bool_)
        self._keys = np.empty(capacity, object)
        self._vals = np.empty(capacity, object)
        self._mask = capacity - 1
        self._len = 0
        self._used = 0  # positions ever used: live ones and tombstones
        self._generation += 1
        # The last batch read: (generation, its keys as an object array, their positions).
        self._reading: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def capacity(self) -> int:
        """Positions in the table (a power of two)."""
        return self._mask + 1

    @property
    def used(self) -> int:
        """Positions ever used since the last rebuild: live keys and tombstones."""
        return self._used

    # -- batches ---------------------------------------------------------------------------

    def _positions(self, wanted: np.ndarray, fps: np.ndarray) -> np.ndarray:
        """The position of each key of ``wanted`` (an object array), -1 where absent."""
        fp, live, mask = self._fp, self._live, self._mask
        pos = fps & mask
        found = np.full(len(wanted), -1, np.int64)
        pending = np.arange(len(wanted))
        while pending.size:
            p = pos[pending]
            seen = fp[p]
            match = (seen == fps[pending]) & live[p]
            if match.any():
                at, which = p[match], pending[match]
                same = np.equal(self._keys[at], wanted[which]).astype(np.bool_)
                found[which[same]] = at[same]
                match[match] = same  # a hash shared with another key: probe on
            pending = pending[~match & (seen != 0)]
            pos[pending] = (pos[pending] + 1) & mask
        return found

    def get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """The value of each key (None where absent), in order. The positions found are kept
        for :meth:`set_many` to write the same keys back without looking them up again."""
        if not keys:
            return []
        wanted = _objects(keys)
        found = self._positions(wanted, _fingerprints(keys))
        if len(set(keys)) == len(keys):  # a write-back of repeated keys could place one twice
            self._reading = (self._generation, wanted, found)
        absent = found < 0
        values: list[Any] = self._vals[np.where(absent, 0, found)].tolist()
        if absent.any():
            for i in np.flatnonzero(absent).tolist():
                values[i] = None
        return values

    def _read_positions(self, wanted: np.ndarray) -> np.ndarray | None:
        """The positions of ``wanted`` from the last read, if it read exactly these keys in
        this order and nothing moved since; else None."""
        reading = self._reading
        if reading is None or reading[0] != self._generation or len(reading[1]) != len(wanted):
            return None
        if not np.equal(reading[1], wanted).astype(np.bool_).all():
            return None
        return reading[2]

    def set_many(self, keys: Sequence[bytes], values: Sequence[Any], distinct: bool = False) -> list[int]:
        """Set each key to its value (the last one where a key repeats); return the indices, in
        ``keys``, of the keys that were new. ``distinct``: the caller knows no key repeats.

        Keys that are exactly those of the last :meth:`get_many`, in its order, are written to
        the positions it found (when no rebuild or deletion came between): no lookup at all."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        if not keys:
            return []
        wanted = _objects(keys)
        # The keys of the last read (distinct: a batch's customers) need no check for repeats.
        from_read = self._read_positions(wanted)
        origin: list[int] | None = None
        if from_read is not None:
            found = from_read
        else:
            if not distinct and len(set(keys)) != len(keys):
                origin = list({key: i for i, key in enumerate(keys)}.values())  # each key's last index
                keys, values = [keys[i] for i in origin], [values[i] for i in origin]
                wanted = _objects(keys)
            all_fps = _fingerprints(keys)
            found = self._positions(wanted, all_fps)
        vals = _objects(values)
        present = found >= 0
        self._vals[found[present]] = vals[present]
        new = np.flatnonzero(~present)
        if not new.size:
            return []
        if from_read is not None:
            # Absent when read; another writer may have added one since: look them up now.
            fps = _fingerprints([keys[i] for i in new.tolist()])
            again = self._positions(wanted[new], fps)
            there = again >= 0
            self._vals[again[there]] = vals[new[there]]
            new, fps = new[~there], fps[~there]
            if not new.size:
                return []
        else:
            fps = all_fps[new]
        self._reserve(int(new.size))
        self._place(fps, wanted[new], vals[new])
        return new.tolist() if origin is None else [origin[i] for i in new.tolist()]

    def delete_many(self, keys: Iterable[bytes]) -> int:
        """Remove each key present; return how many were."""
        keys = list(keys)
        if not keys:
            return 0
        found = self._positions(_objects(keys), _fingerprints(keys))
        at = np.unique(found[found >= 0])
        if not at.size:
            return 0
        self._live[at] = False  # tombstones: the fingerprints stay, so probes go on past them
        self._keys[at] = None
        self._vals[at] = None
        self._len -= int(at.size)
        self._generation += 1
        if self._used > self.capacity // 2 and 2 * self._len < self._used:
            self._rebuild(self.capacity)
        return int(at.size)

    def _place(self, fps: np.ndarray, keys: np.ndarray, vals: np.ndarray) -> None:
        """Insert keys known to be absent, each at the first position on its path that is not live."""
        fp, live, mask = self._fp, self._live, self._mask
        pos = fps & mask
        pending = np.arange(len(fps))
        placed = np.zeros(len(fps), np.bool_)
        while pending.size:
            p = pos[pending]
            free = ~live[p]
            # Several keys may reach the same free position: the first of them takes it.
            at, first = np.unique(p[free], return_index=True)
            winners = pending[free][first]
            self._used += int(np.count_nonzero(fp[at] == 0))
            fp[at] = fps[winners]
            live[at] = True
            self._keys[at] = keys[winners]
            self._vals[at] = vals[winners]
            self._len += int(at.size)
            placed[winners] = True
            pending = pending[~placed[pending]]
            pos[pending] = (pos[pending] + 1) & mask

    def _reserve(self, more: int) -> None:
        """Make room for ``more`` new keys: at most half the positions ever used once they are in."""
        capacity = self.capacity
        if 2 * (self._used + more) <= capacity:
            return
        while 3 * (self._len + more) > capacity:
            capacity *= 2
        self._rebuild(capacity)

    def _rebuild(self, capacity: int) -> None:
        live = np.flatnonzero(self._live)
        fps, keys, vals = self._fp[live], self._keys[live], self._vals[live]
        self._allocate(capacity)
        if live.size:
            self._place(fps, keys, vals)

    # -- one key ---------------------------------------------------------------------------

    def _position(self, key: bytes) -> int:
        h = _fingerprint(key)
        fp, live, keys, mask = self._fp, self._live, self._keys, self._mask
        p = h & mask
        while True:
            seen = int(fp[p])
            if seen == 0:
                return -1
            if seen == h and live[p] and keys[p] == key:
                return p
            p = (p + 1) & mask

    def __getitem__(self, key: bytes) -> Any:
        p = self._position(key)
        if p < 0:
            raise KeyError(key)
        return self._vals[p]

    def get(self, key: bytes, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        p = self._position(key)
        return default if p < 0 else self._vals[p]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._position(key) >= 0

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.set_many([key], [value])

    def __delitem__(self, key: bytes) -> None:
        if not self.delete_many([key]):
            raise KeyError(key)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._keys[self._live].tolist())

    def items(self) -> Any:
        """A list of ``(key, value)`` pairs (a snapshot, not a view)."""
        live = self._live
        return list(zip(self._keys[live].tolist(), self._vals[live].tolist()))

    def values(self) -> Any:
        """A list of the values (a snapshot, not a view)."""
        return self._vals[self._live].tolist()

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """As ``dict.update``, a batch at a time (Faust recovers a table with one call per fetch)."""
        if kwargs:
            raise TypeError("StateIndex keys are bytes, not keyword names")
        pairs = list(other.items() if isinstance(other, Mapping) else other)
        if pairs:
            keys, values = zip(*pairs)
            self.set_many(list(keys), list(values))

    def clear(self) -> None:
        self._allocate(_MIN_CAPACITY)

    def __repr__(self) -> str:
        return f"StateIndex({len(self)} keys, {self.capacity} positions)"
