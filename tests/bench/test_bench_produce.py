"""The benchmark's producer against the real broker: every record, placed by key, in order, across chunks."""

from __future__ import annotations

import asyncio
import time

from aiokafka.partitioner import murmur2

from bench.run import produce
from tests.streams.faustext.test_outbox import PARTITIONS, _read, _topic


def test_the_bench_appends_every_record_where_send_would_in_order_across_chunks(bootstrap: str) -> None:
    topic = _topic(bootstrap)
    keys = [f"c{i:04d}".encode() for i in range(50)]
    records = [(k, f"{k.decode()}#{n}".encode()) for n in range(7) for k in keys]

    started = time.perf_counter()
    took = produce(bootstrap, topic, records, chunk=60)  # several chunks, one cutting a key's records apart
    around = time.perf_counter() - started

    # The seconds it reports are those of the whole call (connecting, sending, every ack), in seconds:
    # all but the call's own overhead of the time measured around it.
    assert around - 0.05 <= took <= around
    got = asyncio.run(_read(bootstrap, topic, len(records)))
    assert sorted((r.key, r.value) for r in got) == sorted(records)
    for r in got:
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % PARTITIONS
    for k in keys:
        assert [r.value for r in got if r.key == k] == [f"{k.decode()}#{n}".encode() for n in range(7)]
