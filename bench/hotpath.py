"""`make bench-hot`: the pure hot path alone (process_batch), no broker, in CPU time.

The worker's throughput is this path plus Kafka I/O and Faust; this isolates
the part gradeflow's own code decides, so that a change to decoding, folding,
rules or change building can be judged in seconds. Same records as
`make bench` (bench/run.py:generate), batches of ``--batch`` records, states
kept in a dict as the memory store keeps them. CPU time, not wall time: other
work on the machine changes it less.

    python -m bench.hotpath --events 200000 --customers 20000 [--ruleset rfm-5] [--no-clock] [--profile]

On a VM whose neighbours come and go, CPU time moves by ±20% between runs of the same code.
Instructions do not: under valgrind (50 times slower, so a small run), the instructions of
grading alone are those of a run less those of the same run with ``--setup-only``:

    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        python -m bench.hotpath --events 10000 --customers 1000 --no-clock [--setup-only]

(``I refs`` of the two, difference divided by the events; docs/performance.md, "Measuring on a shared VM").
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import zlib
from datetime import datetime, timedelta

from bench.run import generate
from schemas.compiled import status as compiled_status
from rules.engine import CompiledRuleset, compile_ruleset
from rules.ruleset import load
from streams.memory import raise_collector_threshold
from streams.processor import TRANSACTIONS, Record, process_batch, utcnow
from streams.settings import Settings
from streams.faustext.state_index import StateIndex


class IndexedStates:
    """States as the worker's memory store holds them: a StateIndex of ``customer_id.encode()``."""

    def __init__(self) -> None:
        self.index = StateIndex()

    def get(self, customer_id: str) -> bytes | None:
        return self.index.get(customer_id.encode())

    def get_many(self, customer_ids: list[str]) -> list[bytes | None]:
        return self.index.get_many([customer_id.encode() for customer_id in customer_ids])

    def write(self, states: dict[str, tuple[bytes, Record]]) -> None:
        self.index.set_many([customer_id.encode() for customer_id in states], [raw for raw, _ in states.values()])

    def sizes(self) -> list[int]:
        return [len(raw) for raw in self.index.values()]


def run(records: list[Record], rs: CompiledRuleset, batch: int, now: datetime,
        clock_horizon: timedelta | None = timedelta(0), plain_dict: bool = False) -> tuple[int, int]:
    """Grade every record in batches; return (grade changes, bytes of state at the end).
    ``clock_horizon``: as a worker with a clock (the default) passes it; None, as with the clock off.
    ``plain_dict``: the states in a dict of ``str`` keys instead of the memory store's index."""
    changes = 0
    if plain_dict:
        states: dict[str, bytes] = {}
        for i in range(0, len(records), batch):
            result = process_batch(records[i:i + batch], rs, states, now, clock_horizon=clock_horizon)
            for customer_id, (raw, _) in result.states.items():
                states[customer_id] = raw
            changes += len(result.grade_changes)
        return changes, sum(len(v) for v in states.values())
    indexed = IndexedStates()
    for i in range(0, len(records), batch):
        result = process_batch(records[i:i + batch], rs, indexed, now, clock_horizon=clock_horizon)
        indexed.write(result.states)
        changes += len(result.grade_changes)
    return changes, sum(indexed.sizes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--ruleset", default="rfm-5")
    parser.add_argument("--no-clock", action="store_true",
                        help="as a worker with GRADEFLOW_CLOCK=off: no clock look per written customer")
    parser.add_argument("--dict", action="store_true", help="the states in a plain dict, not the memory store's index")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one more run")
    parser.add_argument("--setup-only", action="store_true",
                        help="build the records and the ruleset, grade nothing (the baseline of an instruction count)")
    args = parser.parse_args(argv)

    raise_collector_threshold(Settings().gc_threshold)  # as the worker runs (streams/memory.py)
    rs = compile_ruleset(load(args.ruleset))
    records = [Record(TRANSACTIONS, "transactions", zlib.crc32(key) % 4, offset, key, value)
               for offset, (key, value) in enumerate(generate(args.events, args.customers))]
    if args.setup_only:
        return 0
    now = utcnow()
    started = time.process_time()
    horizon = None if args.no_clock else timedelta(0)
    changes, state_bytes = run(records, rs, args.batch, now, horizon, args.dict)
    cpu = time.process_time() - started
    print(f"hot path {compiled_status()}: {args.events} events, {args.customers} customers, {args.ruleset}, clock {'off' if args.no_clock else 'on'}, states in {'a dict' if args.dict else 'the index'}: {cpu:.2f} s CPU, "
          f"{cpu / args.events * 1e6:.1f} µs/event ({args.events / cpu:,.0f} events/s on one core); "
          f"{changes} grade changes ({changes / args.events:.0%}), state {state_bytes / args.customers:.0f} B/customer")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(run, records, rs, args.batch, now, horizon, args.dict)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
