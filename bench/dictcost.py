"""`python -m bench.dictcost`: what one state lookup and one state write cost as customers grow.

The worker's memory store is a Python dict of customer key (bytes) to state (bytes, ~400 B at
ten events per customer). Each event of a growth run reads one customer's state and the batch
writes it back: a lookup and a store per customer a batch touches. This times exactly those two
operations, nothing else, at several dict sizes, with the states scattered over the heap as a
long run leaves them (each replaced a few times, in random order) and a fresh key object per
access, as the worker makes one from each event. The difference between sizes is what memory
alone adds per event: a floor under the growth of `make bench --growth`
(docs/performance.md, "State lookups as customers grow").

    python -m bench.dictcost --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import random
import time

STATE_BYTES = 400  # a state of ten events (bench/hotpath.py prints the size)
BATCH = 2000  # the worker's default batch


def _key(i: int) -> bytes:
    return f"c{i:07d}".encode()


def scattered_store(customers: int, rounds: int = 3, seed: int = 1) -> dict[bytes, bytes]:
    """A dict of ``customers`` states, each replaced ``rounds`` times in random order: as after a
    long run, consecutive customers' states no longer lie next to each other in memory."""
    rng = random.Random(seed)
    store = {_key(i): bytes(STATE_BYTES) for i in range(customers)}
    order = list(range(customers))
    for r in range(rounds):
        rng.shuffle(order)
        for i in order:
            store[_key(i)] = bytes(STATE_BYTES - 8) + r.to_bytes(8, "little")
    return store


def access_cost(store: dict[bytes, bytes], batches: int, seed: int = 2) -> tuple[float, float]:
    """Nanoseconds per key of a lookup and of a write (a new value for an existing key), over
    ``batches`` batches of :data:`BATCH` random customers, each key a fresh object."""
    rng = random.Random(seed)
    customers = len(store)
    get = store.get
    read = write = 0
    for b in range(batches):
        ids = [rng.randrange(customers) for _ in range(BATCH)]
        keys = [_key(i) for i in ids]
        started = time.perf_counter_ns()
        for key in keys:
            get(key)
        read += time.perf_counter_ns() - started
        # Fresh key objects again: in the worker the write comes a broker round trip later,
        # from other objects than the lookup's.
        keys = [_key(i) for i in ids]
        values = [bytes(STATE_BYTES - 8) + b.to_bytes(8, "little") for _ in ids]
        started = time.perf_counter_ns()
        for key, value in zip(keys, values):
            store[key] = value
        write += time.perf_counter_ns() - started
    n = batches * BATCH
    return read / n, write / n


def size_args(argv: list[str] | None, doc: str | None, batches: int) -> tuple[list[int], int]:
    """The customer counts (``--sizes``) and ``--batches`` of a command line, for this and
    bench/indexcost.py."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated customer counts")
    parser.add_argument("--batches", type=int, default=batches)
    args = parser.parse_args(argv)
    return [int(x) for x in args.sizes.split(",")], args.batches


def main(argv: list[str] | None = None) -> int:
    sizes, batches = size_args(argv, __doc__, 300)
    print("| customers | lookup ns | write ns | both ns |")
    print("|---:|---:|---:|---:|")
    for customers in sizes:
        read, write = access_cost(scattered_store(customers), batches)
        print(f"| {customers:,} | {read:.0f} | {write:.0f} | {read + write:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
