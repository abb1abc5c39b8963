"""`streams.faustext.batching.put_back` on a real consumer of the local broker: records fetched but not
delivered are fetched again, unless a seek has moved the partition since."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.faustext.batching import put_back


async def _fetch(consumer: AIOKafkaConsumer, tp: TopicPartition, n: int) -> list[int]:
    offsets: list[int] = []
    for _ in range(50):
        got = await consumer.getmany(tp, timeout_ms=200, max_records=n - len(offsets))
        offsets += [r.offset for r in got.get(tp, [])]
        if len(offsets) >= n:
            break
    return offsets


def test_records_put_back_are_fetched_again_unless_a_seek_came_first(bootstrap) -> None:
    async def run() -> None:
        topic = f"test-put-back-{uuid.uuid4().hex[:8]}"
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for i in range(30):
                await producer.send_and_wait(topic, b"v%d" % i, partition=0)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        tp = TopicPartition(topic, 0)
        try:
            consumer.assign([tp])
            assert await _fetch(consumer, tp, 10) == list(range(10))
            assert put_back(consumer, tp, 0, 10)  # still at 10: sought back to 0
            assert await _fetch(consumer, tp, 10) == list(range(10))
            got = await _fetch(consumer, tp, 10)
            assert got == list(range(10, 20))
            consumer.seek(tp, 5)  # a recovery's seek, after the fetch of 10-19
            assert not put_back(consumer, tp, 10, 20)  # the seek wins
            assert (await _fetch(consumer, tp, 3)) == [5, 6, 7]
            assert not put_back(consumer, TopicPartition(topic, 1), 0, 10)  # not assigned here
        finally:
            await consumer.stop()

    asyncio.run(run())
