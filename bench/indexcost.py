"""`python -m bench.indexcost`: a batch's state reads and writes in a dict against an index whose misses overlap.

A dict lookup is a chain of dependent loads (index slot, entry, stored key, value) and CPython
runs one at a time, so at a million customers a batch's lookups wait for their cache misses one
after another (docs/performance.md, "State lookups as customers grow"). :class:`ArrayIndex` holds
the same keys and values in NumPy arrays (open addressing, linear probing on the key's Python
hash) and reads or writes a whole batch with array operations, whose loads do not depend on each
other. This times the two on `bench.dictcost`'s scattered states, a fresh key object per access,
batches of 2,000 as a worker takes them. docs/performance.md says why the worker kept the dict
("Measured alternatives, rejected").

    python -m bench.indexcost --sizes 10000,1000000
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import numpy as np

from bench.dictcost import BATCH, STATE_BYTES, _key, scattered_store, size_args


def _fingerprints(keys: Sequence[bytes]) -> np.ndarray:
    """Each key's Python hash, 0 (the mark of an empty slot) taken as 1."""
    fps = np.fromiter(map(hash, keys), np.int64, len(keys))
    fps[fps == 0] = 1
    return fps


def _objects(items: Sequence[object]) -> np.ndarray:
    out = np.empty(len(items), object)  # element by element: np.array would make a byte-string array
    out[:] = list(items)
    return out


class ArrayIndex:
    """``bytes`` keys to values in NumPy arrays, read and written a batch at a time (keys present)."""

    def __init__(self, items: dict[bytes, bytes]) -> None:
        capacity = 1 << (3 * len(items)).bit_length()  # at most a third of the slots used
        self.mask = capacity - 1
        self.fp = np.zeros(capacity, np.int64)  # the key's hash; 0: an empty slot
        self.keys = np.empty(capacity, object)
        self.vals = np.empty(capacity, object)
        for (key, value), h in zip(items.items(), _fingerprints(list(items)).tolist()):
            p = h & self.mask
            while self.fp[p]:
                p = (p + 1) & self.mask
            self.fp[p], self.keys[p], self.vals[p] = h, key, value

    def positions(self, keys: Sequence[bytes]) -> np.ndarray:
        """Each key's slot, -1 where absent: every key probed at once, one step a round."""
        fps = _fingerprints(keys)
        wanted = _objects(keys)
        pos = fps & self.mask
        found = np.full(len(keys), -1, np.int64)
        pending = np.arange(len(keys))
        while pending.size:
            p = pos[pending]
            seen = self.fp[p]
            match = seen == fps[pending]
            if match.any():  # a hash shared with another key is no match: the keys are compared
                same = np.equal(self.keys[p[match]], wanted[pending[match]]).astype(np.bool_)
                found[pending[match][same]] = p[match][same]
                match[match] = same
            pending = pending[~match & (seen != 0)]
            pos[pending] = (pos[pending] + 1) & self.mask
        return found

    def get_many(self, keys: Sequence[bytes]) -> list[object]:
        """The value of each key, None where absent."""
        found = self.positions(keys)
        values: list[object] = self.vals[np.where(found < 0, 0, found)].tolist()
        for i in np.flatnonzero(found < 0).tolist():
            values[i] = None
        return values

    def set_many(self, keys: Sequence[bytes], values: Sequence[object]) -> None:
        """New values for keys already present (a batch's write-back of the states it read)."""
        found = self.positions(keys)
        if (found < 0).any():
            raise KeyError("ArrayIndex.set_many writes keys already present only")
        self.vals[found] = _objects(values)


def compare(customers: int, batches: int, seed: int = 2) -> dict[str, float]:
    """Nanoseconds per key of a batch's reads and writes in a dict and in an :class:`ArrayIndex`
    holding the same scattered states; each read checked equal to the dict's."""
    store = scattered_store(customers)
    index = ArrayIndex(store)
    rng = random.Random(seed)
    get = store.get
    took = {"dict read": 0, "dict write": 0, "index read": 0, "index write": 0}
    accessed = 0
    for b in range(batches):
        ids = list({rng.randrange(customers): None for _ in range(BATCH)})  # a batch's distinct customers
        keys = [_key(i) for i in ids]
        started = time.perf_counter_ns()
        from_dict = [get(key) for key in keys]
        took["dict read"] += time.perf_counter_ns() - started
        keys = [_key(i) for i in ids]  # fresh key objects, as the worker makes from each batch
        started = time.perf_counter_ns()
        from_index = index.get_many(keys)
        took["index read"] += time.perf_counter_ns() - started
        if from_index != from_dict:
            raise AssertionError("the index read other states than the dict")
        values = [bytes(STATE_BYTES - 8) + b.to_bytes(8, "little") for _ in ids]
        keys = [_key(i) for i in ids]
        started = time.perf_counter_ns()
        for key, value in zip(keys, values):
            store[key] = value
        took["dict write"] += time.perf_counter_ns() - started
        keys = [_key(i) for i in ids]
        started = time.perf_counter_ns()
        index.set_many(keys, values)
        took["index write"] += time.perf_counter_ns() - started
        accessed += len(ids)
    return {name: ns / accessed for name, ns in took.items()}


def main(argv: list[str] | None = None) -> int:
    sizes, batches = size_args(argv, __doc__, 200)
    names = ["dict read", "dict write", "index read", "index write"]
    print(f"| customers | {' | '.join(f'{name} ns' for name in names)} |")
    print(f"|---:|{'---:|' * len(names)}")
    for customers in sizes:
        ns = compare(customers, batches)
        print(f"| {customers:,} | {' | '.join(f'{ns[name]:.0f}' for name in names)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
