"""The batch path of the consumer (streams/batching.py), without a broker: its read offsets
across a rebalance."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from streams.batching import BatchConsumer

TOPIC = "t-transactions"
TPART = TP(TOPIC, 2)


class _Harness(BatchConsumer):
    """A BatchConsumer with just the state `_drain_messages` reads, fed scripted fetches."""

    def __init__(self, fetches: list[Any], handler) -> None:  # no Service.__init__: nothing runs
        self._stopped = asyncio.Event()
        self._crashed = asyncio.Event()
        self._fetches = fetches
        self._read_offset: dict[TP, int | None] = {TPART: 4}  # committed 5: the next to read
        self._unacked_messages: set[Any] = set()
        self._buffered_partitions: set[TP] = set()
        self._commit_every = None
        self._n_acked = 0
        self.flow_active = True
        self.callback = None  # Faust's path for other topics: none here
        self.seeks = 0
        self.app = SimpleNamespace(_gradeflow_batch_handler=handler, _gradeflow_batch_topics=frozenset({TOPIC}),
                                   consumer_generation_id=1, monitor=None,
                                   topics=SimpleNamespace(acks_enabled_for=lambda topic: True))

    async def perform_seek(self) -> None:
        self.seeks += 1
        self._read_offset[TPART] = 4  # back to the committed offset, 5 the next to read

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)

    async def _wait_next_records(self, timeout: float):
        if not self._fetches:
            self._stopped.set()
            return {}, None
        step = self._fetches.pop(0)
        return step(self), {TPART}


def _records(first: int, last: int) -> list[Any]:
    return [SimpleNamespace(topic=TOPIC, partition=2, offset=o, key=b"k", value=b"v") for o in range(first, last + 1)]


def test_a_fetch_that_spans_a_rebalance_is_dropped_without_skipping_its_records_afterwards() -> None:
    graded: list[int] = []

    async def handler(batch: list[Any]) -> None:
        graded.extend(r.offset for r in batch)

    def across_a_rebalance(consumer: _Harness) -> dict:
        # While this fetch was in flight the group rebalanced, the partition stayed here and was
        # sought back to its committed offset (5).
        consumer.app.consumer_generation_id += 1
        consumer._read_offset[TPART] = 4
        return {TPART: _records(5, 9)}

    def after_the_rebalance_seek(consumer: _Harness) -> dict:
        # Fetched from the committed offset after the rebalance's seek, but returned to a loop
        # that began before the rebalance: dropped, so it must be fetched again.
        consumer.app.consumer_generation_id += 1
        return {TPART: _records(5, 7)}

    def after_the_seek(consumer: _Harness) -> dict:
        return {TPART: _records(5, 12)}

    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    consumer = _Harness([across_a_rebalance, after_the_rebalance_seek, after_the_seek], handler)
    asyncio.run(consumer._drain_messages(fetcher))
    assert graded == list(range(5, 13))  # each record once, none skipped as "delivered before a seek"
    assert consumer.seeks == 2  # every dropped fetch is fetched again from the committed offsets
