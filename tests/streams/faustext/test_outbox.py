"""The outbox against the real broker: placement, order, splitting of large batches."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import murmur2
from kafka.admin import KafkaAdminClient, NewTopic

from streams.faustext.outbox import MAX_BATCH_BYTES, Outbox

PARTITIONS = 4


def _topic(bootstrap: str) -> str:
    name = f"outbox-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        admin.create_topics([NewTopic(name, PARTITIONS, 1)])
    finally:
        admin.close()
    return name


async def _read(bootstrap: str, topic: str, n: int) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None, fetch_max_bytes=64 * 1024 * 1024)
    await consumer.start()
    out: list = []
    try:
        async with asyncio.timeout(60):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(records)
    finally:
        await consumer.stop()
    return out


async def _send(bootstrap: str, fill) -> tuple[list, int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=MAX_BATCH_BYTES)
    await producer.start()
    try:
        outbox = Outbox()
        fill(outbox)
        queued = outbox.count
        sent = await outbox.send(producer)
        batches = await sent.acked()
        assert not outbox and outbox.count == 0  # sent once, not again
        assert len(batches) == len(sent.counts) and sum(sent.counts) == queued
        return batches, queued
    finally:
        await producer.stop()


def test_keyed_records_land_where_the_default_partitioner_puts_them_in_order(bootstrap: str) -> None:
    topic = _topic(bootstrap)
    keys = [f"c{i:05d}".encode() for i in range(200)]
    records = [(k, f"{k.decode()}#{n}".encode()) for n in range(3) for k in keys]

    _, queued = asyncio.run(_send(bootstrap, lambda o: o.extend(topic, records)))
    assert queued == len(records)

    got = asyncio.run(_read(bootstrap, topic, len(records)))
    assert len(got) == len(records)
    for r in got:
        # Kafka's default partitioner (what producer.send() and the Java client do)
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % PARTITIONS
    for k in keys[:20]:
        assert [r.value for r in got if r.key == k] == [f"{k.decode()}#{n}".encode() for n in range(3)]


def test_explicit_partitions_are_kept_and_a_batch_larger_than_a_record_batch_is_split(bootstrap: str) -> None:
    topic = _topic(bootstrap)
    big = b"x" * 4000
    per_partition = MAX_BATCH_BYTES // len(big) * 2 + 7  # over two record batches' worth on each
    records = [(p, f"k{i}".encode(), big + str(i).encode()) for i in range(per_partition) for p in (0, 3)]

    def fill(outbox: Outbox) -> None:
        for p, k, v in records:
            outbox.add(topic, k, v, p)

    batches, _ = asyncio.run(_send(bootstrap, fill))
    assert len(batches) >= 2 * 3  # split into several record batches per partition

    got = asyncio.run(_read(bootstrap, topic, len(records)))
    assert {r.partition for r in got} == {0, 3}
    for p in (0, 3):
        values = [r.value for r in sorted(got, key=lambda r: r.offset) if r.partition == p]
        assert values == [big + str(i).encode() for i in range(per_partition)]
