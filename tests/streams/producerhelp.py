"""A stand-in for AIOKafkaProducer, for offline tests of code that sends through an Outbox."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

from tests.streams.partitionhelp import partition_of


class RecordingProducer:
    """Just enough of AIOKafkaProducer for ``Outbox.send``: places keyed records as the real
    partitioner does (murmur2), and logs ``("send", topic, key, decode(value))`` per record when its
    batch is handed over and ``("ack", topic, partition)`` when the broker would have it (the next
    event-loop turn, so that a test can tell "sent" from "durable")."""

    def __init__(self, log: list | None = None, partitions: int = 4,
                 decode: Callable[[bytes], Any] = lambda value: value) -> None:
        self.log = log if log is not None else []
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes]]]] = []
        self.decode = decode
        every = set(range(partitions))
        self.client = SimpleNamespace(_wait_on_metadata=self._metadata_for)
        self._metadata = SimpleNamespace(partitions_for_topic=lambda topic: every,
                                         available_partitions_for_topic=lambda topic: every)
        self._partitioner = lambda key, every, available: partition_of(key, len(every))

    async def _metadata_for(self, topic: str) -> None:
        return None

    def _ensure_producer(self) -> RecordingProducer:
        return self  # what Faust's producer hands out: the AIOKafkaProducer

    def create_batch(self) -> Any:
        records: list[tuple[bytes, bytes]] = []

        def append(timestamp: int | None, key: bytes, value: bytes) -> int:
            records.append((key, value))
            return 1  # aiokafka's: the appended record's metadata, never None while there is room

        return SimpleNamespace(records=records, append=append)

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        self.sent.append((topic, partition, batch.records))
        self.log.extend(("send", topic, key, self.decode(value)) for key, value in batch.records)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def ack() -> None:
            self.log.append(("ack", topic, partition))
            future.set_result(SimpleNamespace(topic=topic, partition=partition, offset=0))

        loop.call_soon(ack)
        return future


def produce_librdkafka(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]],
                       env: Mapping[str, str] | None = None) -> dict[bytes | None, int]:
    """Send (key, value) records in order with confluent-kafka's default producer (librdkafka, whose
    default partitioner is CRC32-based, not Kafka's Java murmur2), flush, and return the partition
    each key landed on. ``env`` is accepted for the same call shape as ``streams.tools.local.produce``
    (these tests run on the plain local broker)."""
    from confluent_kafka import Producer

    placed: dict[bytes | None, int] = {}
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            placed[msg.key()] = msg.partition()

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, value in records:
        producer.produce(topic, value=value, key=key, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0, "records left unsent"
    assert not errors, errors
    return placed
