"""Exactly-once processing (streams/faustext/transactions.py).

Offline: the setting and its refusals; a fetch graded in one transaction per input partition,
holding that partition's outputs, states, stream-time marker and input offsets, and nothing for a
partition the worker does not own.

On the broker: fencing by transactional id. A worker's transaction open when another worker takes
the partition's id over cannot commit (ProducerFenced), a read_committed reader sees nothing it
sent, its input offsets are not committed, and the fenced worker takes no other id over.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from rules.engine import compile_ruleset
from rules.ruleset import load
from schemas.errors import ConfigurationError
from streams.clock import Clock, stream_key
from streams.faustext.outbox import Outbox
from streams.faustext.transactions import (PartitionProducers, TransactionFailed, input_offsets, offsets_key,
                                           transactional_id)
from streams.handler import BatchGrader
from streams.processor import TRANSACTIONS, Record
from streams.settings import Settings, shadow_diffs_topic, load_settings
from streams.tools.local import drop_run, unique_env
from streams.topics import create_topics
from tests.streams.producerhelp import RecordingProducer

RS = compile_ruleset(load("rfm-5"))
CHANGELOG = "t-customer-state-changelog"


# ---------------------------------------------------------------- settings


def test_at_least_once_is_the_default(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings().processing_guarantee == "at_least_once"
    clean_env.setenv("GRADEFLOW_PROCESSING_GUARANTEE", "exactly_once")
    assert load_settings().processing_guarantee == "exactly_once"


def test_an_unknown_guarantee_is_refused_by_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GRADEFLOW_PROCESSING_GUARANTEE", "exactly_twice")
    with pytest.raises(ConfigurationError, match="GRADEFLOW_PROCESSING_GUARANTEE"):
        load_settings()


def test_exactly_once_refuses_rocksdb(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GRADEFLOW_PROCESSING_GUARANTEE", "exactly_once")
    clean_env.setenv("GRADEFLOW_STORE", "rocksdb://")
    with pytest.raises(ConfigurationError, match="GRADEFLOW_PROCESSING_GUARANTEE=exactly_once needs GRADEFLOW_STORE"):
        load_settings()


def test_input_offsets_are_one_past_the_last_record_of_each_topic_partition() -> None:
    records = [SimpleNamespace(topic="a", partition=0, offset=o) for o in (4, 7, 5)]
    records.append(SimpleNamespace(topic="b", partition=0, offset=2))
    assert input_offsets(records) == {TopicPartition("a", 0): 8, TopicPartition("b", 0): 3}


def test_each_input_partition_has_its_own_transactional_id() -> None:
    assert transactional_id("app", 0) != transactional_id("app", 1)
    assert transactional_id("app", 3) == "app-eos-3"


# ---------------------------------------------------------------- one transaction per partition, offline


class TxnProducer(RecordingProducer):
    """The recording producer with the transactional calls, logged in order."""

    def __init__(self, partition: int, log: list) -> None:
        super().__init__(log)
        self.partition = partition

    async def start(self) -> None:
        self.log.append(("init", self.partition))

    async def stop(self) -> None:
        self.log.append(("stop", self.partition))

    async def begin_transaction(self) -> None:
        self.log.append(("begin", self.partition))

    async def send_offsets_to_transaction(self, offsets: dict[TopicPartition, int], group_id: str) -> None:
        self.log.append(("offsets", self.partition, dict(offsets), group_id))

    async def commit_transaction(self) -> None:
        self.log.append(("commit", self.partition))


class Store:
    """The table's store as the handler uses it: states held, each write queued for the changelog."""

    def __init__(self) -> None:
        self.held: dict[bytes, bytes] = {}

    def get(self, customer_id: str) -> bytes | None:
        return self.held.get(customer_id.encode())

    def get_key(self, key: bytes) -> bytes | None:
        return self.held.get(key)

    def get_many(self, customer_ids: list[str]) -> list[bytes | None]:
        return [self.get(c) for c in customer_ids]

    def write_many(self, outbox: Outbox, states: Any) -> None:
        for key, raw, partition in states:
            self.held[key] = raw
            outbox.add(CHANGELOG, key, raw, partition)


def record(partition: int, offset: int, customer: str, n: int) -> Record:
    doc = {"event_id": f"e{partition}-{n}", "customer_id": customer,
           "occurred_at": f"2024-03-{1 + n:02d}T10:00:00+08:00", "type": "purchase", "amount": "9000.00",
           "currency": "CNY"}
    return Record(TRANSACTIONS, "in", partition, offset, customer.encode(), orjson.dumps(doc), None)


def test_a_fetch_is_one_transaction_per_owned_partition_with_its_outputs_states_time_and_offsets() -> None:
    settings = Settings(clock="event", partitions=4, app_id="t", at_risk_horizon_days=0,
                        processing_guarantee="exactly_once")
    log: list = []
    app = SimpleNamespace(crash=None, assignor=SimpleNamespace(assigned_actives=lambda: []))
    producers = PartitionProducers(app, settings, lambda p: TxnProducer(p, log))
    store = Store()
    clock = Clock(app, settings, RS, store, store)
    grader = BatchGrader(settings, RS, store, clock, None, clock.writer, lambda: None)
    # Partition 3 was revoked since the fetch: its records are its new owner's.
    records = [record(p, 10 + i, f"c{p}-{i % 2}", i) for i in range(3) for p in (0, 1, 3)]

    async def run() -> None:
        await producers.assign([0, 1])
        results, commits = await grader.grade_in_transactions(records, producers)
        await commits
        assert len(results) == 2 and sum(r.consumed for r in results) == 6

    asyncio.run(run())
    assert [e for e in log if e[0] == "init"] == [("init", 0), ("init", 1)]
    # Per partition: begin, the sends, the offsets, the commit; partition 1's transaction begins
    # while partition 0's commits (at most one open per partition).
    by_partition: dict[int, list[tuple]] = {0: [], 1: []}
    current = None
    for e in log:
        if e[0] == "begin":
            current = e[1]
        if e[0] == "send":
            by_partition[current].append(e)  # type: ignore[index]
        elif e[0] in ("begin", "offsets", "commit"):
            by_partition[e[1]].append(e)
    for p in (0, 1):
        mine = by_partition[p]
        kinds = [e[0] for e in mine]
        assert kinds[0] == "begin" and kinds[-2:] == ["offsets", "commit"], kinds
        offsets = mine[-2]
        assert offsets[2] == {TopicPartition("in", p): 13} and offsets[3] == "t"
    sent = {(topic, partition): batch for topic, partition, batch in _sent(producers)}
    for p in (0, 1):
        keys = [key for key, _ in sent[(CHANGELOG, p)]]
        # The customers' states, then the partition's stream time and input watermark, in the
        # same transaction.
        assert set(keys[:-2]) == {f"c{p}-0".encode(), f"c{p}-1".encode()}
        assert keys[-2:] == [stream_key(p), offsets_key(p)]
    assert not any(partition == 3 for _, partition in sent)
    assert store.get("c3-0") is None and store.get("c3-1") is None
    assert producers.stats.committed == 2


def test_records_fetched_again_after_a_seek_are_not_graded_twice() -> None:
    # A seek to the committed offsets while this worker's last commit is under way fetches records
    # its transactions already hold: a malformed one would be dead-lettered twice.
    settings = Settings(clock="off", partitions=4, app_id="t", processing_guarantee="exactly_once")
    log: list = []
    app = SimpleNamespace(crash=None)
    producers = PartitionProducers(app, settings, lambda p: TxnProducer(p, log))
    store = Store()
    clock = Clock(app, settings, RS, store, store)
    grader = BatchGrader(settings, RS, store, clock, None, clock.writer, lambda: None)
    malformed = Record(TRANSACTIONS, "in", 0, 11, b"c0-0", b"{not json", None)
    first = [record(0, 10, "c0-0", 0), malformed]
    again = [*first, record(0, 12, "c0-0", 1)]

    async def run() -> list[int]:
        await producers.assign([0])
        consumed = []
        for records in (first, again, again):
            results, commits = await grader.grade_in_transactions(records, producers)
            await commits
            consumed.append(sum(r.consumed for r in results))
        await producers.revoke([0])
        await producers.assign([0])  # the watermark is table state: it holds across owners
        results, commits = await grader.grade_in_transactions(first, producers)
        await commits
        consumed.append(sum(r.consumed for r in results))
        return consumed

    assert asyncio.run(run()) == [2, 1, 0, 0]
    dead = [e for e in log if e[0] == "send" and e[1] == settings.topics.dead_letters]
    assert len(dead) == 1
    assert [e[2] for e in log if e[0] == "offsets"] == [{TopicPartition("in", 0): 12}, {TopicPartition("in", 0): 13}]
    # The watermark went to the changelog in each transaction, with the states.
    marks = [orjson.loads(e[3]) for e in log if e[0] == "send" and e[1] == CHANGELOG and e[2] == offsets_key(0)]
    assert marks == [{"in": 12}, {"in": 13}]


def _sent(producers: PartitionProducers) -> list[tuple[str, int, list[tuple[bytes, bytes]]]]:
    return [s for producer in producers._producers.values() for s in producer.sent]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- fencing, on the broker


async def _read(bootstrap: str, topic: str, isolation: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, isolation_level=isolation)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                values.extend(r.value for r in records)
        return values
    finally:
        await consumer.stop()


async def _committed(bootstrap: str, group: str, tp: TopicPartition) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(tp)
    finally:
        await consumer.stop()


def test_a_worker_whose_partition_id_is_taken_over_cannot_commit(bootstrap: str) -> None:
    env = unique_env("fence", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_PROCESSING_GUARANTEE="exactly_once")
    settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in env.items()})
    create_topics(settings)
    out = settings.topics.grade_changes
    source = TopicPartition(settings.topics.transactions, 0)
    crashed: list[BaseException] = []

    async def crash(exc: BaseException) -> None:
        crashed.append(exc)

    def new_producer(partition: int) -> AIOKafkaProducer:
        return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                transactional_id=transactional_id(settings.group_id, partition))

    first = PartitionProducers(SimpleNamespace(crash=crash), settings, new_producer)
    second = PartitionProducers(SimpleNamespace(crash=None), settings, new_producer)

    async def run() -> None:
        try:
            await first.assign([0])
            producer = await first.begin(0)
            assert producer is not None
            await producer.send_and_wait(out, b"first", key=b"c", partition=0)  # on the log, uncommitted
            await second.assign([0])  # the partition's new owner: InitProducerId bumps the epoch
            with pytest.raises(TransactionFailed, match="ProducerFenced"):
                await first.commit(0, producer, {source: 5})
            assert first.stats.fenced == 1 and first.stats.committed == 0
            await asyncio.sleep(0)  # the crash is scheduled, not awaited, by the failing commit
            assert len(crashed) == 1
            # A fenced worker takes no other id over (that would fence a worker doing nothing wrong),
            # and opens no transaction.
            with pytest.raises(TransactionFailed):
                await first.assign([1])
            with pytest.raises(TransactionFailed):
                await first.begin(0)
            assert first.owned() == {0}
            # The new owner commits.
            producer = await second.begin(0)
            assert producer is not None
            await producer.send(out, b"second", key=b"c", partition=0)
            await second.commit(0, producer, {source: 3})
            assert await _read(bootstrap, out, "read_committed") == [b"second"]
            assert sorted(await _read(bootstrap, out, "read_uncommitted")) == [b"first", b"second"]
            assert await _committed(bootstrap, settings.group_id, source) == 3
        finally:
            await first.stop()
            await second.stop()

    try:
        asyncio.run(run())
    finally:
        drop_run(bootstrap, env)


def test_aiokafka_sends_transactional_offsets_without_member_or_generation() -> None:
    # Why the design is one producer per input partition (the module's doc): if a release of aiokafka
    # sends the group's member id and generation (KIP-447), one producer per worker becomes possible.
    from aiokafka.protocol import transaction

    versions = [getattr(transaction, name) for name in dir(transaction) if name.startswith("TxnOffsetCommitRequest_v")]
    assert versions
    for version in versions:
        fields = set(version.SCHEMA.names)
        assert "group_id" in fields and not fields & {"member_id", "generation_id"}, (version, fields)


def test_shadow_records_ride_in_the_partitions_transaction() -> None:
    from rules import shadow
    from streams.shadow import ShadowStats
    from tests.rules.shadowhelp import candidate

    shadows = shadow.prepare(RS, [candidate()])
    settings = Settings(clock="event", partitions=4, app_id="t", at_risk_horizon_days=0,
                        processing_guarantee="exactly_once")
    log: list = []
    app = SimpleNamespace(crash=None, assignor=SimpleNamespace(assigned_actives=lambda: []))
    producers = PartitionProducers(app, settings, lambda p: TxnProducer(p, log))
    store = Store()
    clock = Clock(app, settings, RS, store, store)
    grader = BatchGrader(settings, RS, store, clock, None, clock.writer, lambda: None, shadows, ShadowStats(shadows))
    records = [record(0, 10 + i, f"c0-{i % 2}", i) for i in range(4)]

    async def run() -> None:
        await producers.assign([0])
        results, commits = await grader.grade_in_transactions(records, producers)
        await commits
        assert results[0].shadow_diffs

    asyncio.run(run())
    kinds = [e[0] for e in log if e[0] in ("begin", "send", "offsets", "commit")]
    assert kinds[0] == "begin" and kinds[-2:] == ["offsets", "commit"] and kinds.count("commit") == 1
    topics = {topic for topic, _partition, _batch in _sent(producers)}
    assert shadow_diffs_topic(settings) in topics and settings.topics.grade_changes in topics
