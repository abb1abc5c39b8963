"""The batch path of the consumer (streams/batching.py), without a broker: what it delivers, and
what it fetches again, across a rebalance."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from streams.batching import BatchConsumer

TOPIC = "t-transactions"
TPART = TP(TOPIC, 2)
CHANGELOG = TP("t-customer-state-changelog", 2)


class _Harness(BatchConsumer):
    """A BatchConsumer with just the state `_drain_messages` reads, fed scripted fetches."""

    def __init__(self, fetches: list[Any]) -> None:  # no Service.__init__: nothing runs
        self._stopped = asyncio.Event()
        self._crashed = asyncio.Event()
        self._fetches = fetches
        self._read_offset: dict[TP, int | None] = {TPART: 4, CHANGELOG: None}  # committed 5: the next to read
        self._unacked_messages: set[Any] = set()
        self._buffered_partitions: set[TP] = set()
        self._commit_every = None
        self._n_acked = 0
        self.flow_active = True
        self.delivered: list[tuple[str, int]] = []  # what took Faust's path (changelogs, other topics)
        self.seeks = 0
        self.unread: list[tuple[str, int, int]] = []  # records put back: (topic, first, last offset)
        self.steps: list[str] = []  # seeks and put-backs, in order
        self.graded: list[int] = []  # the offsets the batch handler got, in order
        self.app = SimpleNamespace(_gradeflow_batch_handler=self._grade, _gradeflow_batch_topics=frozenset({TOPIC}),
                                   consumer_generation_id=1, monitor=None,
                                   topics=SimpleNamespace(acks_enabled_for=lambda topic: True))

    async def _grade(self, batch: list[Any]) -> None:
        self.graded.extend(r.offset for r in batch)

    async def callback(self, message: Any) -> None:
        self.delivered.append((message.topic, message.offset))

    def _to_message(self, tp: TP, record: Any) -> Any:
        return record

    async def wait_first(self, *coros: Any, timeout: float | None = None) -> None:
        await coros[0]
        for extra in coros[1:]:
            extra.close()

    @property
    def suspend_flow(self) -> Any:
        return SimpleNamespace(wait=lambda: asyncio.sleep(3600))

    async def _unread(self, tp: TP, records: list[Any]) -> None:
        if records:
            self.unread.append((tp.topic, records[0].offset, records[-1].offset))
            self.steps.append(f"put back {tp.topic}")

    async def perform_seek(self) -> None:
        # Faust's: every partition to its committed offset; a changelog has none (None).
        self.seeks += 1
        self.steps.append("seek")
        self._read_offset[TPART] = 4  # back to the committed offset, 5 the next to read
        self._read_offset[CHANGELOG] = None

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)

    async def _wait_next_records(self, timeout: float):
        if not self._fetches:
            self._stopped.set()
            return {}, None
        step = self._fetches.pop(0)
        got = step(self)
        # A step returns the records, or the records and the partitions active (not paused) by then.
        return got if isinstance(got, tuple) else (got, {TPART, CHANGELOG})


def _drain(harness: type[_Harness], fetches: list[Any]) -> _Harness:
    """Run the drain loop over the scripted ``fetches``; the harness tells what it did."""
    consumer = harness(fetches)
    asyncio.run(consumer._drain_messages(SimpleNamespace(_stopped=asyncio.Event())))
    return consumer


def _records(first: int, last: int, tp: TP = TPART) -> list[Any]:
    return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=o, key=b"k", value=b"v")
            for o in range(first, last + 1)]


def test_a_fetch_that_spans_a_rebalance_is_dropped_without_skipping_its_records_afterwards() -> None:
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

    consumer = _drain(_Harness, [across_a_rebalance, after_the_rebalance_seek, after_the_seek])
    assert consumer.graded == list(range(5, 13))  # each record once, none skipped as "delivered before a seek"
    assert consumer.seeks == 2  # every dropped fetch is fetched again from the committed offsets


def test_changelog_records_of_a_fetch_that_spans_a_rebalance_reach_the_recovery() -> None:
    # A worker takes over partition 2 and recovers its table from the changelog. The fetch that
    # the new generation's recovery asked for returns to a loop that began before the rebalance:
    # its changelog records must be delivered all the same (nothing would fetch them again, and
    # the customers in them would look new), while the input records are fetched again.
    def recovery_fetch(consumer: _Harness) -> dict:
        consumer.app.consumer_generation_id += 1
        return {CHANGELOG: _records(0, 40, CHANGELOG), TPART: _records(5, 9)}

    def after_the_seek(consumer: _Harness) -> dict:
        return {CHANGELOG: _records(41, 44, CHANGELOG), TPART: _records(5, 12)}

    consumer = _drain(_Harness, [recovery_fetch, after_the_seek])
    assert consumer.delivered == [(CHANGELOG.topic, o) for o in range(45)]
    assert consumer.graded == list(range(5, 13))
    assert consumer.seeks == 1


def test_a_rebalance_during_delivery_drops_the_rest_of_the_fetch_and_seeks_back() -> None:
    # A rebalance while Faust's path takes a changelog record: the input records already put in
    # the batch are not graded (the partition may have moved); they come again after the seek.
    class _Rebalancing(_Harness):
        async def callback(self, message: Any) -> None:
            await super().callback(message)
            if message.offset == 2:
                self.app.consumer_generation_id += 1

    def mixed(consumer: _Harness) -> dict:
        return {TPART: _records(5, 9), CHANGELOG: _records(0, 4, CHANGELOG)}

    def after_the_seek(consumer: _Harness) -> dict:
        return {TPART: _records(5, 7)}

    consumer = _drain(_Rebalancing, [mixed, after_the_seek])
    assert consumer.delivered == [(CHANGELOG.topic, o) for o in range(3)]
    # Not delivered: put back for the recovery; the input records after the seek (below).
    assert consumer.unread == [(CHANGELOG.topic, 3, 4), (TOPIC, 5, 9)]
    assert consumer.graded == [5, 6, 7]
    assert consumer.seeks == 1


def test_input_records_of_a_partition_paused_since_the_fetch_are_fetched_again_in_order() -> None:
    # After a takeover the input partition is paused while its table recovers; a fetch that
    # returns its records then (the partition was paused after the fetch began) must not leave
    # a hole that the next fetch's records jump over: 10-12 graded before 5-9 would grade
    # customers on their events out of order.
    def while_paused(consumer: _Harness) -> tuple:
        return {TPART: _records(5, 9)}, {CHANGELOG}

    def next_fetch(consumer: _Harness) -> dict:
        # From the committed offset after a seek; else from where the dropped fetch left off.
        return {TPART: _records(5, 12)} if consumer.seeks else {TPART: _records(10, 12)}

    consumer = _drain(_Harness, [while_paused, next_fetch])
    assert consumer.graded == list(range(5, 13))
    assert consumer.seeks == 1


def test_changelog_records_fetched_while_the_flow_is_stopped_are_put_back() -> None:
    # A fetch that returns while a rebalance has stopped the flow is dropped whole, as Faust drops
    # it; its changelog records may come from positions the recovery has already set, and the
    # recovery will not seek again: they are put back. The input records come again after a seek.
    def stopped(consumer: _Harness) -> dict:
        consumer.flow_active = False
        return {CHANGELOG: _records(0, 199, CHANGELOG), TPART: _records(5, 9)}

    def resumed(consumer: _Harness) -> dict:
        consumer.flow_active = True
        return {TPART: _records(5, 9)}

    consumer = _drain(_Harness, [stopped, resumed])
    assert consumer.delivered == []
    assert consumer.unread == [(CHANGELOG.topic, 0, 199), (TOPIC, 5, 9)]
    assert consumer.graded == list(range(5, 10))
    assert consumer.seeks == 1


def test_changelog_records_of_a_paused_partition_are_put_back() -> None:
    def paused(consumer: _Harness) -> tuple:
        return {CHANGELOG: _records(0, 9, CHANGELOG), TPART: _records(5, 6)}, {TPART}

    consumer = _drain(_Harness, [paused])
    assert consumer.delivered == [] and consumer.unread == [(CHANGELOG.topic, 0, 9)]
    assert consumer.graded == [5, 6] and consumer.seeks == 0


def test_dropped_input_records_are_put_back_after_the_seek_to_the_committed_offsets() -> None:
    # A takeover of a partition with no committed offset (its owner was killed before its first
    # commit): the seek to the committed offsets leaves it where the dropped fetch took it, past
    # the records. Putting them back after the seek re-reads them there; where the seek did move
    # the partition, it wins (streams.batching.put_back; tests/streams/test_put_back.py).
    def across_a_rebalance(consumer: _Harness) -> dict:
        consumer.app.consumer_generation_id += 1
        return {TPART: _records(5, 9)}

    consumer = _drain(_Harness, [across_a_rebalance])
    assert consumer.graded == []
    assert consumer.steps == ["seek", f"put back {TOPIC}"]
    assert consumer.unread == [(TOPIC, 5, 9)]
