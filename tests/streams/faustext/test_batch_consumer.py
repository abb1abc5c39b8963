"""The batch path of the consumer (streams/faustext/batching.py), without a broker: what it delivers, and
what it fetches again, across a rebalance."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import pytest
from faust.types import TP
from mode.utils.times import Seconds

from streams.faustext.batching import BatchConsumer

TOPIC = "t-transactions"
TPART = TP(TOPIC, 2)
CHANGELOG = TP("t-customer-state-changelog", 2)


class _Harness(BatchConsumer):
    """A BatchConsumer with just the state `_drain_messages` reads, fed scripted fetches."""

    def __init__(self, fetches: list[Any]) -> None:  # no Service.__init__: nothing runs
        # Plain asyncio events stand in for mode's (the same interface, no Service running).
        self._stopped = cast(Any, asyncio.Event())
        self._crashed = cast(Any, asyncio.Event())
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
        self.app = cast(Any, SimpleNamespace(_gradeflow_batch_handler=self._grade, _gradeflow_batch_topics=frozenset({TOPIC}),
                                   consumer_generation_id=1, monitor=None,
                                   topics=SimpleNamespace(acks_enabled_for=lambda topic: True)))

    async def _grade(self, batch: list[Any]) -> None:
        self.graded.extend(r.offset for r in batch)

    async def callback(self, message: Any) -> None:
        self.delivered.append((message.topic, message.offset))

    def _to_message(self, tp: TP, record: Any) -> Any:
        return record

    async def wait_first(self, *coros: Any, timeout: Seconds | None = None) -> Any:
        await coros[0]
        for extra in coros[1:]:
            extra.close()

    @property  # a fake: the drain loop only reads it
    def suspend_flow(self) -> Any:  # type: ignore[override]
        return SimpleNamespace(wait=lambda: asyncio.sleep(3600))

    async def _unread(self, tp: TP, records: Sequence[Any]) -> None:
        if records:
            self.unread.append((tp.topic, records[0].offset, records[-1].offset))
            self.steps.append(f"put back {tp.topic}")

    async def perform_seek(self) -> None:
        # Faust's: every partition to its committed offset; a changelog has none (None).
        self.seeks += 1
        self.steps.append("seek")
        self._read_offset[TPART] = 4  # back to the committed offset, 5 the next to read
        self._read_offset[CHANGELOG] = None

    async def sleep(self, seconds: Seconds) -> None:
        await asyncio.sleep(0)

    async def _wait_next_records(self, timeout: float):
        if not self._fetches:
            self._stopped.set()
            return {}, None
        step = self._fetches.pop(0)
        got = step(self)
        # A step returns the records, or the records and the partitions active (not paused) by then.
        return got if isinstance(got, tuple) else (got, {TPART, CHANGELOG})


H = TypeVar("H", bound=_Harness)


def _drain(harness: type[H], fetches: list[Any]) -> H:
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
    # the partition, it wins (streams.faustext.batching.put_back; tests/streams/faustext/test_put_back.py).
    def across_a_rebalance(consumer: _Harness) -> dict:
        consumer.app.consumer_generation_id += 1
        return {TPART: _records(5, 9)}

    consumer = _drain(_Harness, [across_a_rebalance])
    assert consumer.graded == []
    assert consumer.steps == ["seek", f"put back {TOPIC}"]
    assert consumer.unread == [(TOPIC, 5, 9)]


class _Recovering(_Harness):
    """The harness with a real Faust app's tables: the memory store and Faust's Recovery, which
    reads ``CHANGELOG`` as an active partition whose highwater is 44."""

    store = "gradeflow-memory://"
    datadir = ""

    def __init__(self, fetches: list[Any]) -> None:
        super().__init__(fetches)
        import faust

        app = faust.App("t", store=self.store, datadir=self.datadir) if self.datadir else faust.App("t", store=self.store)
        self.table: Any = app.Table("customer-state", partitions=4, key_type=bytes, value_type=bytes)
        recovery: Any = cast(Any, app.tables).recovery
        recovery.tp_to_table = {CHANGELOG: self.table}
        recovery.active_tps = {CHANGELOG}
        recovery.active_highwaters[CHANGELOG] = 44
        recovery.active_offsets[CHANGELOG] = -1
        recovery._set_recovery_started()
        self.recovery = recovery
        self.logged: list[str] = []
        self.log = cast(Any, SimpleNamespace(info=lambda fmt, *args: self.logged.append(fmt % args)))
        self.app.tables = app.tables
        # Changelog topics are not acked (Faust commits no offsets for them); input topics are.
        self.app.topics = cast(Any, SimpleNamespace(acks_enabled_for=lambda topic: topic == TOPIC))


def _versions(first: int, last: int) -> list[Any]:
    """Changelog records ``first``..``last``: offset o writes key ``k{o % 7}`` = ``v{o}``."""
    return [SimpleNamespace(topic=CHANGELOG.topic, partition=CHANGELOG.partition, offset=o,
                            key=f"k{o % 7}".encode(), value=f"v{o}".encode()) for o in range(first, last + 1)]


@pytest.mark.parametrize("store", ["gradeflow-memory://", "rocksdb://"])
def test_a_recovering_changelog_partition_is_applied_a_fetch_at_a_time_and_ends_the_recovery(store, tmp_path) -> None:
    from streams.faustext.tables import FaustStateStore

    class _InStore(_Recovering):
        pass

    _InStore.store, _InStore.datadir = store, str(tmp_path)
    consumer = _drain(_InStore, [lambda c: {CHANGELOG: _versions(0, 40), TPART: _records(5, 9)},
                                lambda c: {CHANGELOG: _versions(41, 44)}])
    assert consumer.delivered == []  # no record took Faust's path (a Message and an Event each)
    assert consumer.bulk_recovered == 45
    # Each key holds its last version, on the partition it was read from (RocksDB: one database
    # per partition), and nothing is held for another partition.
    store_ = FaustStateStore(consumer.table)
    assert {key: raw for key, _, raw in store_.partition_items({CHANGELOG.partition})} == {
        f"k{o % 7}".encode(): f"v{o}".encode() for o in range(38, 45)}
    assert list(store_.partition_items({0, 1, 3})) == []
    if store == "rocksdb://":  # it knows how far it holds the changelog: a restart reads on from there
        assert consumer.table.data.persisted_offset(CHANGELOG) == 44
    recovery = consumer.recovery
    assert recovery.active_offsets[CHANGELOG] == 44
    assert not recovery.in_recovery and recovery.signal_recovery_end.is_set()
    assert consumer.logged == ["gradeflow: tables recovered; 45 changelog records applied a fetch at a time "
                               "since the worker started"]
    assert consumer.graded == list(range(5, 10))  # the input records still go to the batch handler


def test_a_recovery_that_starts_soon_after_one_ended_here_waits_for_its_own_records() -> None:
    # A recovery this path ended leaves Faust's end signal set (Faust's own loop would have cleared
    # it); a rebalance right after must not find it set and skip reading its changelogs.
    consumer = _drain(_Recovering, [lambda c: {CHANGELOG: _versions(0, 44)}])
    recovery = consumer.recovery
    assert not recovery.in_recovery and recovery.signal_recovery_end.is_set()
    recovery.active_highwaters[CHANGELOG] = 90  # the next rebalance: more to read
    recovery._set_recovery_started()
    assert recovery.in_recovery and not recovery.signal_recovery_end.is_set()


def test_a_recovery_still_behind_its_highwater_does_not_end() -> None:
    consumer = _drain(_Recovering, [lambda c: {CHANGELOG: _versions(0, 40)}])
    assert consumer.recovery.active_offsets[CHANGELOG] == 40
    assert consumer.recovery.in_recovery and not consumer.recovery.signal_recovery_end.is_set()
    assert consumer.logged == []


def test_changelog_records_recovery_has_read_already_are_not_applied_again() -> None:
    def seen_to_30(consumer: _Recovering) -> dict:
        # Recovery counts 0-30 as read already (Faust's path buffered them before this fetch).
        consumer.recovery.active_offsets[CHANGELOG] = 30
        consumer.recovery.active_highwaters[CHANGELOG] = 60  # still recovering after 44
        return {CHANGELOG: _versions(0, 30)}

    def rest(consumer: _Recovering) -> dict:
        assert len(consumer.table.data.data) == 0  # 0-30 were not applied a second time
        return {CHANGELOG: _versions(31, 44)}

    def again_after_a_seek(consumer: _Recovering) -> dict:
        consumer._read_offset[CHANGELOG] = None  # a seek back: the drain loop lets them through
        return {CHANGELOG: _versions(20, 30)}

    consumer = _drain(_Recovering, [seen_to_30, rest, again_after_a_seek])
    held = dict(consumer.table.data.data.items())
    assert held == {f"k{o % 7}".encode(): f"v{o}".encode() for o in range(38, 45)}  # not v20-v30
    assert consumer.recovery.active_offsets[CHANGELOG] == 44
    assert consumer.delivered == [] and consumer.recovery.in_recovery


def test_records_buffered_by_faust_s_path_are_applied_before_the_fetch_that_follows_them() -> None:
    def buffered_then_fetch(consumer: _Recovering) -> dict:
        # Faust's path took offsets 0-5 into its recovery buffer (counted as read, not applied).
        consumer.recovery.buffers[consumer.table].extend(
            SimpleNamespace(key=r.key, value=r.value, message=SimpleNamespace(value=r.value, partition=r.partition))
            for r in _versions(0, 5))
        consumer.recovery.active_offsets[CHANGELOG] = 5
        return {CHANGELOG: _versions(6, 8)}

    consumer = _drain(_Recovering, [buffered_then_fetch])
    held = dict(consumer.table.data.data.items())
    # k0..k5 from the buffer, k6 from the fetch, then offsets 7 and 8 overwrite k0 and k1.
    assert held == {b"k0": b"v7", b"k1": b"v8", b"k2": b"v2", b"k3": b"v3", b"k4": b"v4", b"k5": b"v5", b"k6": b"v6"}
    assert consumer.recovery.buffers[consumer.table] == []


def test_faust_s_path_runs_while_its_queue_holds_records_and_outside_recovery() -> None:
    def queued(consumer: _Recovering) -> dict:
        # Records Faust's path delivered are still in its queue: later ones must go behind them.
        cast(Any, consumer.app.tables).changelog_queue.put_nowait(object())
        return {CHANGELOG: _versions(0, 3)}

    consumer = _drain(_Recovering, [queued])
    assert consumer.delivered == [(CHANGELOG.topic, o) for o in range(4)] and consumer.bulk_recovered == 0

    def recovered(consumer: _Recovering) -> dict:
        consumer.recovery._set_recovery_ended()  # an active partition's straggler after recovery
        return {CHANGELOG: _versions(0, 3)}

    consumer = _drain(_Recovering, [recovered])
    assert consumer.delivered == [(CHANGELOG.topic, o) for o in range(4)] and consumer.bulk_recovered == 0
